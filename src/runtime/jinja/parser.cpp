// Lexer and recursive-descent parser for the Jinja subset of chat templates. Whitespace handling follows Jinja
// with HF's environment: trim_blocks and lstrip_blocks on, keep_trailing_newline off, newlines normalised to \n.
#include <algorithm>
#include <cctype>
#include <cstring>
#include <string>

#include "core/error.h"
#include "runtime/jinja/ast.h"
#include "runtime/unicode.h"

namespace trellm::jinja {
namespace {

struct Token {
  enum Type { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, End } type;
  std::string text;
  Loc loc;
  int64_t ival = 0;
  double fval = 0;
};

class Lexer {
 public:
  Lexer(const std::string& src, const std::string& name) : name_(name) {
    // Jinja normalises \r\n and \r to \n and drops one trailing newline (keep_trailing_newline=False).
    src_.reserve(src.size());
    for (size_t i = 0; i < src.size(); i++) {
      if (src[i] == '\r') {
        src_ += '\n';
        if (i + 1 < src.size() && src[i + 1] == '\n') i++;
      } else {
        src_ += src[i];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    size_t pos = 0;
    bool line_starting = true;
    while (pos < src_.size()) {
      size_t start = find_tag(pos);
      std::string data = src_.substr(pos, start == std::string::npos ? std::string::npos : start - pos);
      if (start == std::string::npos) {
        push_data(data, pos);
        break;
      }
      char kind = src_[start + 1];
      char mod = start + 2 < src_.size() && (src_[start + 2] == '-' || src_[start + 2] == '+') ? src_[start + 2] : 0;
      if (mod == '-') {
        size_t e = data.size();
        while (e > 0 && std::isspace((unsigned char)data[e - 1])) e--;
        data.resize(e);
      } else if ((kind == '%' || kind == '#') && mod != '+') {
        // lstrip_blocks: drop spaces/tabs between the start of the line and a block or comment tag.
        size_t l_pos = data.rfind('\n');
        l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
        if (l_pos > 0 || line_starting) {
          bool blank = true;
          for (size_t k = l_pos; k < data.size(); k++)
            if (data[k] != ' ' && data[k] != '\t') { blank = false; break; }
          if (blank) data.resize(l_pos);
        }
      }
      push_data(data, pos);
      size_t inner = start + 2 + (mod ? 1 : 0);
      if (kind == '#') {
        size_t end = src_.find("#}", inner);
        if (end == std::string::npos) error(start, "unclosed comment");
        bool strip = end > inner && src_[end - 1] == '-';
        pos = end + 2;
        pos = after_close(pos, strip, true, src_[end - 1] == '+', line_starting);
        continue;
      }
      Token b;
      b.type = kind == '{' ? Token::VarBegin : Token::BlockBegin;
      b.loc = loc_of(start);
      toks_.push_back(b);
      pos = lex_tag(inner, kind == '{' ? '}' : '%', line_starting);
    }
    Token e;
    e.type = Token::End;
    e.loc = loc_of(src_.size());
    toks_.push_back(e);
    return std::move(toks_);
  }

 private:
  std::string src_, name_;
  std::vector<Token> toks_;

  [[noreturn]] void error(size_t off, const std::string& msg) const {
    Loc l = loc_of(off);
    fail(name_, ":", l.line, ":", l.col, ": ", msg);
  }
  // Tokens come in increasing offsets: go on from the last one (rescanning from the start made lexing quadratic,
  // seconds for a 50 KB template).
  mutable size_t loc_off_ = 0;
  mutable Loc loc_;
  Loc loc_of(size_t off) const {
    off = std::min(off, src_.size());
    if (off < loc_off_) loc_off_ = 0, loc_ = Loc{};
    for (; loc_off_ < off; loc_off_++) {
      if (src_[loc_off_] == '\n') { loc_.line++; loc_.col = 1; }
      else if ((uint8_t(src_[loc_off_]) & 0xC0) != 0x80) loc_.col++;
    }
    return loc_;
  }
  size_t find_tag(size_t pos) const {
    for (size_t i = src_.find('{', pos); i != std::string::npos; i = src_.find('{', i + 1))
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    return std::string::npos;
  }
  void push_data(const std::string& d, size_t off) {
    if (d.empty()) return;
    Token t;
    t.type = Token::Data;
    t.text = d;
    t.loc = loc_of(off);
    toks_.push_back(std::move(t));
  }
  // After a closing delimiter: "-" strips all following whitespace; trim_blocks drops one newline after a block
  // or comment tag (not after "+%}").
  size_t after_close(size_t pos, bool strip, bool is_block, bool plus, bool& line_starting) {
    size_t p = pos;
    if (strip) {
      while (p < src_.size() && std::isspace((unsigned char)src_[p])) p++;
    } else if (is_block && !plus && p < src_.size() && src_[p] == '\n') {
      p++;
    }
    line_starting = p > pos && src_[p - 1] == '\n';
    return p;
  }

  size_t lex_tag(size_t pos, char closer, bool& line_starting) {
    int depth = 0;
    size_t tag_start = pos;
    for (;;) {
      while (pos < src_.size() && std::isspace((unsigned char)src_[pos])) pos++;
      if (pos >= src_.size()) error(tag_start - 2, closer == '}' ? "unclosed '{{'" : "unclosed '{%'");
      char c = src_[pos];
      // Closing delimiter (only when no bracket is open: "{{ {'a': {}} }}" keeps its braces).
      if (depth == 0) {
        size_t p = pos;
        bool strip = false, plus = false;
        if ((src_[p] == '-' || src_[p] == '+') && p + 2 < src_.size() + 0 && src_[p + 1] == closer && src_[p + 2] == '}') {
          strip = src_[p] == '-';
          plus = src_[p] == '+';
          p++;
        }
        if (p + 1 < src_.size() && src_[p] == closer && src_[p + 1] == '}') {
          Token t;
          t.type = closer == '}' ? Token::VarEnd : Token::BlockEnd;
          t.loc = loc_of(pos);
          toks_.push_back(t);
          return after_close(p + 2, strip, closer == '%', plus, line_starting);
        }
      }
      Token t;
      t.loc = loc_of(pos);
      if (std::isalpha((unsigned char)c) || c == '_') {
        size_t e = pos;
        while (e < src_.size() && (std::isalnum((unsigned char)src_[e]) || src_[e] == '_')) e++;
        t.type = Token::Name;
        t.text = src_.substr(pos, e - pos);
        pos = e;
      } else if (std::isdigit((unsigned char)c)) {
        size_t e = pos;
        bool is_float = false;
        while (e < src_.size() && (std::isdigit((unsigned char)src_[e]) || src_[e] == '_')) e++;
        if (e + 1 < src_.size() && src_[e] == '.' && std::isdigit((unsigned char)src_[e + 1])) {
          is_float = true;
          e++;
          while (e < src_.size() && (std::isdigit((unsigned char)src_[e]) || src_[e] == '_')) e++;
        }
        if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
          size_t k = e + 1;
          if (k < src_.size() && (src_[k] == '+' || src_[k] == '-')) k++;
          if (k < src_.size() && std::isdigit((unsigned char)src_[k])) {
            is_float = true;
            e = k;
            while (e < src_.size() && std::isdigit((unsigned char)src_[e])) e++;
          }
        }
        std::string num;
        for (size_t k = pos; k < e; k++)
          if (src_[k] != '_') num += src_[k];
        t.text = num;
        try {
          if (is_float) { t.type = Token::Float; t.fval = std::stod(num); }
          else { t.type = Token::Int; t.ival = std::stoll(num); }
        } catch (const std::exception&) {
          error(pos, "number out of range: " + num);
        }
        pos = e;
      } else if (c == '\'' || c == '"') {
        t.type = Token::String;
        pos = lex_string(pos, t.text);
      } else {
        static const char* ops[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "|", ".",
                                    ",", ":", "(", ")", "[", "]", "{", "}", "=", "<", ">"};
        const char* found = nullptr;
        for (const char* op : ops)
          if (src_.compare(pos, std::strlen(op), op) == 0) { found = op; break; }
        if (!found) error(pos, std::string("unexpected character '") + c + "'");
        t.type = Token::Op;
        t.text = found;
        pos += std::strlen(found);
        if (t.text == "(" || t.text == "[" || t.text == "{") depth++;
        if (t.text == ")" || t.text == "]" || t.text == "}") depth--;
      }
      toks_.push_back(std::move(t));
    }
  }

  // Python string literal with backslash escapes (Jinja decodes them with "unicode-escape").
  size_t lex_string(size_t pos, std::string& out) {
    char q = src_[pos];
    size_t i = pos + 1;
    for (;;) {
      if (i >= src_.size()) error(pos, "unterminated string literal");
      char c = src_[i];
      if (c == q) return i + 1;
      if (c != '\\') { out += c; i++; continue; }
      if (i + 1 >= src_.size()) error(pos, "unterminated string literal");
      char e = src_[i + 1];
      i += 2;
      auto hex = [&](int n) {  // exactly n hex digits, as Python requires (std::stoul threw on "\\xzz")
        uint32_t v = 0;
        for (int k = 0; k < n; k++) {
          const char h = i + size_t(k) < src_.size() ? src_[i + size_t(k)] : '\0';
          if (!std::isxdigit((unsigned char)h)) error(i - 2, "truncated \\x/\\u escape");
          v = v * 16 + uint32_t(h <= '9' ? h - '0' : (h | 0x20) - 'a' + 10);
        }
        if (v > 0x10FFFF) error(i - 2, "illegal Unicode character in \\U escape");
        i += size_t(n);
        utf8_append(out, v);
      };
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'v': out += '\v'; break;
        case 'a': out += '\a'; break;
        case '0': out += '\0'; break;
        case '\n': break;
        case 'x': hex(2); break;
        case 'u': hex(4); break;
        case 'U': hex(8); break;
        default: out += '\\'; out += e;  // unknown escapes stay as written (Python keeps them)
      }
    }
  }
};

class Parser {
 public:
  Parser(std::vector<Token> toks, const std::string& name) : t_(std::move(toks)), name_(name) {}

  Body parse_all() {
    std::string end;
    Body b = parse_body({}, end);
    return b;
  }

 private:
  std::vector<Token> t_;
  size_t p_ = 0;
  std::string name_;
  int nest_ = 0;

  // Nesting is bounded: the parser recurses per level, and evaluating and freeing the tree recurse over it
  // ("1 + 1 + ..." 2,000 terms long, or 50,000 "(", overflowed the stack). Real chat templates nest < 20 deep.
  static constexpr int kMaxNesting = 100;
  // A recursion level of the parser (statements, parenthesised and unary expressions).
  struct Nest {
    Parser& p;
    Nest(Parser& parser, const Loc& loc) : p(parser) {
      if (++p.nest_ > kMaxNesting) p.error(loc, "the template nests deeper than " + std::to_string(kMaxNesting) + " levels");
    }
    ~Nest() { p.nest_--; }
  };
  // A finished node: its depth is 1 + its deepest operand's, at most kMaxNesting.
  ExprPtr bounded(ExprPtr e) {
    for (const auto* v : {&e->args, &e->kwargs})
      for (const auto& a : *v)
        if (a) e->depth = std::max(e->depth, a->depth + 1);
    if (e->depth > kMaxNesting) error(e->loc, "expression nests deeper than " + std::to_string(kMaxNesting) + " levels");
    return e;
  }

  const Token& cur() const { return t_[p_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  [[noreturn]] void error(const Loc& l, const std::string& msg) const { fail(name_, ":", l.line, ":", l.col, ": ", msg); }
  [[noreturn]] void unexpected(const std::string& what) const {
    const Token& t = cur();
    std::string got = t.type == Token::End ? "end of template" : t.type == Token::BlockEnd ? "'%}'"
                    : t.type == Token::VarEnd ? "'}}'" : t.type == Token::String ? "string" : "'" + t.text + "'";
    error(t.loc, "expected " + what + ", got " + got);
  }
  bool is_op(const char* op) const { return cur().type == Token::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == Token::Name && cur().text == n; }
  void expect_op(const char* op) {
    if (!is_op(op)) unexpected(std::string("'") + op + "'");
    p_++;
  }
  std::string expect_name() {
    if (cur().type != Token::Name) unexpected("a name");
    return t_[p_++].text;
  }
  void expect_block_end() {
    if (cur().type != Token::BlockEnd) unexpected("'%}'");
    p_++;
  }

  // Parses statements until a block tag whose name is in `ends` (consumed up to and including the name).
  Body parse_body(const std::vector<std::string>& ends, std::string& end_found) {
    Body body;
    for (;;) {
      const Token& t = cur();
      if (t.type == Token::End) {
        if (!ends.empty()) error(t.loc, "unexpected end of template, expected '{% " + ends.back() + " %}'");
        return body;
      }
      if (t.type == Token::Data) {
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::Text;
        s->loc = t.loc;
        s->text = t.text;
        body.push_back(std::move(s));
        p_++;
      } else if (t.type == Token::VarBegin) {
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::Output;
        s->loc = t.loc;
        p_++;
        s->expr = parse_tuple(false);
        if (cur().type != Token::VarEnd) unexpected("'}}'");
        p_++;
        body.push_back(std::move(s));
      } else if (t.type == Token::BlockBegin) {
        Loc loc = t.loc;
        p_++;
        if (cur().type != Token::Name) unexpected("a tag name");
        std::string tag = cur().text;
        for (const auto& e : ends)
          if (tag == e) { p_++; end_found = tag; return body; }
        p_++;
        body.push_back(parse_statement(tag, loc));
      } else {
        unexpected("template text or a tag");
      }
    }
  }

  StmtPtr parse_statement(const std::string& tag, Loc loc) {
    Nest nest(*this, loc);
    auto s = std::make_unique<Stmt>();
    s->loc = loc;
    std::string end;
    if (tag == "if") {
      s->kind = Stmt::If;
      s->conds.push_back(parse_expression());
      expect_block_end();
      for (;;) {
        s->bodies.push_back(parse_body({"elif", "else", "endif"}, end));
        if (end == "elif") {
          s->conds.push_back(parse_expression());
          expect_block_end();
        } else if (end == "else") {
          expect_block_end();
          s->bodies.push_back(parse_body({"endif"}, end));
          expect_block_end();
          break;
        } else {
          expect_block_end();
          break;
        }
      }
    } else if (tag == "for") {
      s->kind = Stmt::For;
      s->targets.push_back(expect_name());
      while (is_op(",")) { p_++; s->targets.push_back(expect_name()); }
      if (!is_name("in")) unexpected("'in'");
      p_++;
      s->expr = parse_tuple(true, /*with_condexpr=*/false);
      if (is_name("if")) { p_++; s->filter = parse_expression(); }
      if (is_name("recursive")) error(cur().loc, "recursive for loops are not supported");
      expect_block_end();
      s->bodies.push_back(parse_body({"else", "endfor"}, end));
      if (end == "else") {
        expect_block_end();
        s->bodies.push_back(parse_body({"endfor"}, end));
      }
      expect_block_end();
    } else if (tag == "set") {
      std::string first = expect_name();
      if (is_op(".")) {
        p_++;
        s->kind = Stmt::Set;
        auto obj = std::make_unique<Expr>();
        obj->kind = Expr::Name;
        obj->loc = loc;
        obj->name = first;
        s->target_obj = std::move(obj);
        s->attr = expect_name();
      } else {
        s->targets.push_back(first);
        while (is_op(",")) { p_++; s->targets.push_back(expect_name()); }
      }
      if (is_op("=")) {
        p_++;
        s->kind = Stmt::Set;
        s->expr = parse_tuple(true);
        expect_block_end();
      } else {
        if (s->target_obj || s->targets.size() != 1) unexpected("'='");
        s->kind = Stmt::SetBlock;
        expect_block_end();
        s->bodies.push_back(parse_body({"endset"}, end));
        expect_block_end();
      }
    } else if (tag == "macro") {
      s->kind = Stmt::Macro;
      s->name = expect_name();
      expect_op("(");
      while (!is_op(")")) {
        s->params.push_back(expect_name());
        if (is_op("=")) { p_++; s->defaults.push_back(parse_expression()); }
        else s->defaults.push_back(nullptr);
        if (!is_op(")")) expect_op(",");
      }
      p_++;
      expect_block_end();
      s->bodies.push_back(parse_body({"endmacro"}, end));
      expect_block_end();
    } else if (tag == "break" || tag == "continue") {
      s->kind = tag == "break" ? Stmt::Break : Stmt::Continue;
      expect_block_end();
    } else if (tag == "generation") {
      // transformers' AssistantTracker extension: marks assistant text, renders its body unchanged.
      s->kind = Stmt::Passthrough;
      expect_block_end();
      s->bodies.push_back(parse_body({"endgeneration"}, end));
      expect_block_end();
    } else if (tag.rfind("end", 0) == 0 || tag == "elif" || tag == "else") {
      error(loc, "unexpected '{% " + tag + " %}'");
    } else {
      error(loc, "unsupported tag '" + tag + "'");
    }
    return s;
  }

  ExprPtr make(Expr::Kind k, Loc loc) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->loc = loc;
    return e;
  }

  // a, b, c -> tuple (a list value); a single expression stays itself.
  ExprPtr parse_tuple(bool allow_tuple, bool with_condexpr = true) {
    Loc loc = cur().loc;
    ExprPtr first = with_condexpr ? parse_expression() : parse_or();
    if (!allow_tuple || !is_op(",")) return first;
    auto t = make(Expr::TupleLit, loc);
    t->args.push_back(std::move(first));
    while (is_op(",")) {
      p_++;
      if (cur().type == Token::BlockEnd || cur().type == Token::VarEnd || is_name("if")) break;
      t->args.push_back(with_condexpr ? parse_expression() : parse_or());
    }
    return bounded(std::move(t));
  }

  ExprPtr parse_expression() {
    Nest nest(*this, cur().loc);
    ExprPtr e = parse_or();
    while (is_name("if")) {
      Loc loc = cur().loc;
      p_++;
      auto c = make(Expr::Cond, loc);
      ExprPtr cond = parse_or();
      ExprPtr other;
      if (is_name("else")) { p_++; other = parse_expression(); }
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(cond));
      c->args.push_back(std::move(other));  // may be null: undefined
      e = bounded(std::move(c));
    }
    return e;
  }
  ExprPtr parse_or() {
    ExprPtr l = parse_and();
    while (is_name("or")) {
      auto n = make(Expr::Or, cur().loc);
      p_++;
      n->args.push_back(std::move(l));
      n->args.push_back(parse_and());
      l = bounded(std::move(n));
    }
    return l;
  }
  ExprPtr parse_and() {
    ExprPtr l = parse_not();
    while (is_name("and")) {
      auto n = make(Expr::And, cur().loc);
      p_++;
      n->args.push_back(std::move(l));
      n->args.push_back(parse_not());
      l = bounded(std::move(n));
    }
    return l;
  }
  ExprPtr parse_not() {
    if (is_name("not")) {
      Nest nest(*this, cur().loc);
      auto n = make(Expr::Not, cur().loc);
      p_++;
      n->args.push_back(parse_not());
      return bounded(std::move(n));
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    Loc loc = cur().loc;
    ExprPtr first = parse_math1();
    ExprPtr cmp;
    for (;;) {
      std::string op;
      if (cur().type == Token::Op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                      cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        op = cur().text;
        p_++;
      } else if (is_name("in")) {
        op = "in";
        p_++;
      } else if (is_name("not") && peek().type == Token::Name && peek().text == "in") {
        op = "not in";
        p_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(Expr::Compare, loc);
        cmp->args.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? bounded(std::move(cmp)) : std::move(first);
  }
  ExprPtr binary(const std::string& op, ExprPtr l, ExprPtr r, Loc loc) {
    auto n = make(Expr::Binary, loc);
    n->name = op;
    n->args.push_back(std::move(l));
    n->args.push_back(std::move(r));
    return bounded(std::move(n));
  }
  ExprPtr parse_math1() {
    ExprPtr l = parse_concat();
    while (is_op("+") || is_op("-")) {
      Token t = cur();
      p_++;
      l = binary(t.text, std::move(l), parse_concat(), t.loc);
    }
    return l;
  }
  ExprPtr parse_concat() {
    ExprPtr l = parse_math2();
    while (is_op("~")) {
      Token t = cur();
      p_++;
      l = binary("~", std::move(l), parse_math2(), t.loc);
    }
    return l;
  }
  ExprPtr parse_math2() {
    ExprPtr l = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      Token t = cur();
      p_++;
      l = binary(t.text, std::move(l), parse_pow(), t.loc);
    }
    return l;
  }
  ExprPtr parse_pow() {
    ExprPtr l = parse_unary(true);
    while (is_op("**")) {
      Token t = cur();
      p_++;
      l = binary("**", std::move(l), parse_unary(true), t.loc);
    }
    return l;
  }
  ExprPtr parse_unary(bool with_filter) {
    ExprPtr n;
    if (is_op("-") || is_op("+")) {
      Nest nest(*this, cur().loc);
      auto u = make(is_op("-") ? Expr::Neg : Expr::Pos, cur().loc);
      p_++;
      u->args.push_back(parse_unary(false));
      n = bounded(std::move(u));
    } else {
      n = parse_primary();
    }
    n = parse_postfix(std::move(n));
    if (with_filter) n = parse_filter_expr(std::move(n));
    return n;
  }
  ExprPtr parse_primary() {
    const Token& t = cur();
    Loc loc = t.loc;
    if (t.type == Token::Name) {
      p_++;
      auto e = make(Expr::Literal, loc);
      if (t.text == "true" || t.text == "True") e->literal = Value(true);
      else if (t.text == "false" || t.text == "False") e->literal = Value(false);
      else if (t.text == "none" || t.text == "None") e->literal = Value::none();
      else { e->kind = Expr::Name; e->name = t.text; }
      return e;
    }
    if (t.type == Token::String) {
      std::string s;
      while (cur().type == Token::String) s += t_[p_++].text;  // adjacent literals concatenate
      auto e = make(Expr::Literal, loc);
      e->literal = Value(s);
      return e;
    }
    if (t.type == Token::Int || t.type == Token::Float) {
      p_++;
      auto e = make(Expr::Literal, loc);
      e->literal = t.type == Token::Int ? Value(t.ival) : Value(t.fval);
      return e;
    }
    if (is_op("(")) {
      p_++;
      if (is_op(")")) { p_++; return make(Expr::TupleLit, loc); }
      ExprPtr e = parse_expression();
      if (is_op(",")) {
        auto tup = make(Expr::TupleLit, loc);
        tup->args.push_back(std::move(e));
        while (is_op(",")) {
          p_++;
          if (is_op(")")) break;
          tup->args.push_back(parse_expression());
        }
        e = bounded(std::move(tup));
      }
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      p_++;
      auto e = make(Expr::ListLit, loc);
      while (!is_op("]")) {
        e->args.push_back(parse_expression());
        if (!is_op("]")) expect_op(",");
      }
      p_++;
      return bounded(std::move(e));
    }
    if (is_op("{")) {
      p_++;
      auto e = make(Expr::DictLit, loc);
      while (!is_op("}")) {
        e->args.push_back(parse_expression());
        expect_op(":");
        e->kwargs.push_back(parse_expression());
        if (!is_op("}")) expect_op(",");
      }
      p_++;
      return bounded(std::move(e));
    }
    unexpected("an expression");
  }
  void parse_call_args(Expr& call) {
    expect_op("(");
    while (!is_op(")")) {
      if (cur().type == Token::Name && peek().type == Token::Op && peek().text == "=") {
        call.kwnames.push_back(cur().text);
        p_ += 2;
        call.kwargs.push_back(parse_expression());
      } else {
        if (!call.kwargs.empty()) error(cur().loc, "positional argument follows keyword argument");
        call.args.push_back(parse_expression());
      }
      if (!is_op(")")) expect_op(",");
    }
    p_++;
  }
  ExprPtr parse_postfix(ExprPtr n) {
    for (;;) {
      if (is_op(".")) {
        Loc loc = cur().loc;
        p_++;
        if (cur().type == Token::Int) {
          auto e = make(Expr::Item, loc);
          auto idx = make(Expr::Literal, loc);
          idx->literal = Value(t_[p_++].ival);
          e->args.push_back(std::move(n));
          e->args.push_back(std::move(idx));
          n = bounded(std::move(e));
        } else {
          auto e = make(Expr::Attr, loc);
          e->name = expect_name();
          e->args.push_back(std::move(n));
          n = bounded(std::move(e));
        }
      } else if (is_op("[")) {
        Loc loc = cur().loc;
        p_++;
        ExprPtr parts[3];
        bool slice = false;
        for (int k = 0; k < 3; k++) {
          if (!is_op(":") && !is_op("]")) parts[k] = parse_expression();
          if (k < 2 && is_op(":")) { slice = true; p_++; continue; }
          break;
        }
        expect_op("]");
        auto e = make(slice ? Expr::Slice : Expr::Item, loc);
        e->args.push_back(std::move(n));
        if (slice) {
          for (auto& pt : parts) e->args.push_back(std::move(pt));  // null parts: omitted bounds
        } else {
          if (!parts[0]) error(loc, "empty subscript");
          e->args.push_back(std::move(parts[0]));
        }
        n = bounded(std::move(e));
      } else if (is_op("(")) {
        auto e = make(Expr::Call, n->loc);  // errors in a call point at the callee's start
        e->args.push_back(std::move(n));
        parse_call_args(*e);
        n = bounded(std::move(e));
      } else {
        return n;
      }
    }
  }
  ExprPtr parse_filter_expr(ExprPtr n) {
    for (;;) {
      if (is_op("|")) {
        auto f = make(Expr::Filter, cur().loc);
        p_++;
        f->name = expect_name();
        while (is_op(".")) { p_++; f->name += "." + expect_name(); }
        f->args.push_back(std::move(n));
        if (is_op("(")) parse_call_args(*f);
        n = bounded(std::move(f));
      } else if (is_name("is")) {
        auto t = make(Expr::Test, cur().loc);
        p_++;
        if (is_name("not")) { t->negated = true; p_++; }
        t->name = expect_name();
        t->args.push_back(std::move(n));
        const Token& c = cur();
        if (is_op("(")) {
          parse_call_args(*t);
        } else if ((c.type == Token::Name || c.type == Token::String || c.type == Token::Int || c.type == Token::Float ||
                    is_op("[") || is_op("{")) &&
                   !(c.type == Token::Name && (c.text == "else" || c.text == "or" || c.text == "and" ||
                                               c.text == "if" || c.text == "is" || c.text == "in" || c.text == "not"))) {
          // `x is divisibleby 3`, `x is sameas false`: one argument without parentheses.
          t->args.push_back(parse_postfix(parse_primary()));
        }
        n = bounded(std::move(t));
      } else if (is_op("(")) {
        auto e = make(Expr::Call, cur().loc);
        e->args.push_back(std::move(n));
        parse_call_args(*e);
        n = bounded(std::move(e));
      } else {
        return n;
      }
    }
  }
};

}  // namespace

std::shared_ptr<Template> parse_template(const std::string& source, const std::string& name) {
  auto t = std::make_shared<Template>();
  t->name = name;
  Lexer lx(source, name);
  Parser ps(lx.run(), name);
  t->body = ps.parse_all();
  return t;
}

}  // namespace trellm::jinja
