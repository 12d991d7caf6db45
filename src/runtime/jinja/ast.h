// Syntax tree of a parsed Jinja template, and the parser entry point.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "runtime/jinja/value.h"

namespace trellm::jinja {

struct Loc { int line = 1, col = 1; };

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum Kind { Literal, Name, ListLit, DictLit, TupleLit, Attr, Item, Slice, Call, Filter, Test, Neg, Pos, Not,
              Binary, Compare, And, Or, Cond };
  Kind kind;
  Loc loc;
  Value literal;                   // Literal
  std::string name;                // Name, Attr, Filter, Test; Binary op ("+", "~", ...)
  std::vector<ExprPtr> args;       // operands / items / call/filter/test positional args (Filter: args[0] is the input)
  std::vector<std::string> kwnames;  // keyword argument names for the trailing kwargs.size() entries of kwargs
  std::vector<ExprPtr> kwargs;
  std::vector<std::string> ops;    // Compare: operators between args[i] and args[i+1]
  bool negated = false;            // Test: "is not"
  int depth = 1;                   // 1 + the deepest operand's (the parser bounds it)
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Stmt {
  enum Kind { Text, Output, If, For, Set, SetBlock, Macro, Break, Continue, Passthrough };
  Kind kind;
  Loc loc;
  std::string text;                       // Text
  ExprPtr expr;                           // Output; Set value; For iterable
  std::vector<ExprPtr> conds;             // If: one per branch (an else branch has none)
  std::vector<Body> bodies;               // If branches; For: body [, else]; SetBlock/Macro/Passthrough: body
  std::vector<std::string> targets;       // For / Set: names ("a" or several for unpacking)
  ExprPtr target_obj;                     // Set ns.attr: the object expression; name in `attr`
  std::string attr;
  ExprPtr filter;                         // For ... if filter
  std::string name;                       // Macro name
  std::vector<std::string> params;        // Macro parameters
  std::vector<ExprPtr> defaults;          // Macro defaults (nullptr when none), aligned with params
};

struct Template {
  std::string name;
  Body body;
};

// Parses template source with HF's settings (trim_blocks, lstrip_blocks, no trailing newline kept).
// Throws trellm::Error "name:line:col: message" on a syntax error.
std::shared_ptr<Template> parse_template(const std::string& source, const std::string& name);

}  // namespace trellm::jinja
