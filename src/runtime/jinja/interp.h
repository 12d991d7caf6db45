// Evaluation of a parsed template: scopes, statements, expressions. Builtin filters, tests, functions and
// methods live in builtins.cpp.
#pragma once
#include <stdexcept>
#include <string>

#include "runtime/jinja/ast.h"

namespace trellm::jinja {

// Raised while rendering; the interpreter adds the location of the node being evaluated.
struct RenderError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Scope {
  std::vector<std::pair<std::string, Value>> vars;
  Scope* parent = nullptr;
  Value* find(const std::string& k) {
    for (Scope* s = this; s; s = s->parent)
      for (auto& v : s->vars)
        if (v.first == k) return &v.second;
    return nullptr;
  }
  void set(const std::string& k, Value v) {
    for (auto& e : vars)
      if (e.first == k) { e.second = std::move(v); return; }
    vars.emplace_back(k, std::move(v));
  }
};

// What one render may use, so a hostile template fails with an error instead of exhausting the stack, the
// memory or the time (found fuzzing, issue 17). Real chat templates stay far below each.
constexpr int kMaxRenderDepth = 500;                 // nested evaluations (expressions, statements, macro calls)
constexpr int64_t kMaxRenderSteps = 2'000'000;       // evaluations, loop iterations (10 each); GLM: ~65 a message
constexpr size_t kMaxRenderBytes = size_t(16) << 20;  // output, and any string or list a template builds

class Interp {
 public:
  Interp(const Template& t, Scope& globals) : tpl_(t), root_(globals) {}
  std::string render();

  // Used by builtins.
  Value apply_filter(const std::string& name, const Value& input, CallArgs& args, const Loc& loc);
  bool apply_test(const std::string& name, const Value& v, CallArgs& args, const Loc& loc);

 private:
  enum class Flow { Normal, Break, Continue };
  const Template& tpl_;
  Scope& root_;
  int depth_ = 0;
  int64_t steps_ = 0;
  // One level of evaluation: bounded in depth, `cost` steps of the budget.
  struct Frame {
    Interp& in;
    explicit Frame(Interp& interp, int64_t cost = 1);
    ~Frame() { in.depth_--; }
  };
  void append(std::string& out, const std::string& s);  // out += s, within kMaxRenderBytes

  Flow exec(const Body& body, Scope& scope, std::string& out);
  Flow exec_stmt(const Stmt& s, Scope& scope, std::string& out);
  Value eval(const Expr& e, Scope& scope);
  Value eval_inner(const Expr& e, Scope& scope);
  Value make_macro(const Stmt& s);
  [[noreturn]] void error(const Loc& loc, const std::string& msg) const;
};

// Builtins (builtins.cpp).
Value get_attr(const Value& obj, const std::string& name);   // obj.name (methods first, then items)
Value get_item(const Value& obj, const Value& key);          // obj[key]
Value slice_value(const Value& obj, const Value& a, const Value& b, const Value& c);
Value binary_op(const std::string& op, const Value& a, const Value& b);
bool contains(const Value& container, const Value& item);
size_t py_len(const Value& v);
// Iteration as Python does it: list items, dict keys, string characters. Undefined iterates as empty.
std::vector<Value> iterate(const Value& v);
void install_globals(Scope& globals);

}  // namespace trellm::jinja
