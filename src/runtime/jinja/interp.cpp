#include "runtime/jinja/interp.h"

#include <climits>

#include "core/error.h"

namespace trellm::jinja {

void Interp::error(const Loc& loc, const std::string& msg) const {
  fail(tpl_.name, ":", loc.line, ":", loc.col, ": ", msg);
}

Interp::Frame::Frame(Interp& interp, int64_t cost) : in(interp) {
  if (++in.depth_ > kMaxRenderDepth) {
    in.depth_--;
    throw RenderError("evaluation nests deeper than " + std::to_string(kMaxRenderDepth) + " levels (recursive macro?)");
  }
  if ((in.steps_ += cost) > kMaxRenderSteps) {
    in.depth_--;
    throw RenderError("the template ran for more than " + std::to_string(kMaxRenderSteps) + " steps");
  }
}

void Interp::append(std::string& out, const std::string& s) {
  if (out.size() + s.size() > kMaxRenderBytes)
    throw RenderError("the output would exceed " + std::to_string(kMaxRenderBytes >> 20) + " MB");
  out += s;
}

std::string Interp::render() {
  std::string out;
  Flow f = exec(tpl_.body, root_, out);
  (void)f;
  return out;
}

Interp::Flow Interp::exec(const Body& body, Scope& scope, std::string& out) {
  for (const auto& s : body) {
    Flow f = exec_stmt(*s, scope, out);
    if (f != Flow::Normal) return f;
  }
  return Flow::Normal;
}

Value Interp::make_macro(const Stmt& s) {
  const Stmt* def = &s;
  Interp* self = this;
  return Value::function(
      [self, def](CallArgs& a) -> Value {
        // A macro sees its arguments and the template's top-level variables, not its caller's locals.
        Scope local;
        local.parent = &self->root_;
        for (size_t i = 0; i < def->params.size(); i++) {
          Value v = a.get(i, def->params[i]);
          if (v.is_undefined() && !a.has(i, def->params[i]) && def->defaults[i]) v = self->eval(*def->defaults[i], local);
          local.set(def->params[i], v);
        }
        if (a.args.size() > def->params.size())
          throw RenderError("macro '" + def->name + "' takes " + std::to_string(def->params.size()) +
                            " arguments, got " + std::to_string(a.args.size()));
        std::string out;
        self->exec(def->bodies[0], local, out);
        return Value(out);
      },
      s.name);
}

static void unpack(Scope& scope, const std::vector<std::string>& targets, const Value& v) {
  if (targets.size() == 1) {
    scope.set(targets[0], v);
    return;
  }
  std::vector<Value> items = iterate(v);
  if (items.size() != targets.size())
    throw RenderError("cannot unpack " + std::to_string(items.size()) + " values into " +
                      std::to_string(targets.size()) + " names");
  for (size_t i = 0; i < targets.size(); i++) scope.set(targets[i], items[i]);
}

Interp::Flow Interp::exec_stmt(const Stmt& s, Scope& scope, std::string& out) {
  try {
    Frame frame(*this);
    switch (s.kind) {
      case Stmt::Text: append(out, s.text); return Flow::Normal;
      case Stmt::Output: append(out, eval(*s.expr, scope).to_str()); return Flow::Normal;
      case Stmt::If:
        for (size_t i = 0; i < s.bodies.size(); i++) {
          if (i >= s.conds.size() || eval(*s.conds[i], scope).truthy()) return exec(s.bodies[i], scope, out);
        }
        return Flow::Normal;
      case Stmt::For: {
        Value seq = eval(*s.expr, scope);
        if (!seq.is_list() && !seq.is_dict() && !seq.is_string() && !seq.is_undefined())
          throw RenderError(std::string("'") + seq.type_name() + "' object is not iterable");
        std::vector<Value> items = iterate(seq);
        if (s.filter) {
          // `for x in xs if cond`: filtered before the loop, so loop.length/last count only kept items.
          std::vector<Value> kept;
          for (const auto& it : items) {
            Scope fs;
            fs.parent = &scope;
            unpack(fs, s.targets, it);
            if (eval(*s.filter, fs).truthy()) kept.push_back(it);
          }
          items.swap(kept);
        }
        if (items.empty()) {
          if (s.bodies.size() > 1) return exec(s.bodies[1], scope, out);
          return Flow::Normal;
        }
        const int64_t n = int64_t(items.size());
        for (int64_t i = 0; i < n; i++) {
          Frame step(*this, 10);  // an iteration (its loop object, its scope) costs about 10 evaluations
          Scope body;
          body.parent = &scope;
          Value loop = Value::dict();
          Dict& d = loop.dict_ref();
          d.set("index", Value(i + 1));
          d.set("index0", Value(i));
          d.set("revindex", Value(n - i));
          d.set("revindex0", Value(n - i - 1));
          d.set("first", Value(i == 0));
          d.set("last", Value(i == n - 1));
          d.set("length", Value(n));
          d.set("depth", Value(1));
          d.set("depth0", Value(0));
          d.set("previtem", i > 0 ? items[size_t(i - 1)] : Value());
          d.set("nextitem", i + 1 < n ? items[size_t(i + 1)] : Value());
          d.set("cycle", Value::function([i](CallArgs& a) -> Value {
                  if (a.args.empty()) throw RenderError("loop.cycle() needs arguments");
                  return a.args[size_t(i) % a.args.size()];
                }, "cycle"));
          body.set("loop", loop);
          unpack(body, s.targets, items[size_t(i)]);
          Flow f = exec(s.bodies[0], body, out);
          if (f == Flow::Break) break;
        }
        return Flow::Normal;
      }
      case Stmt::Set: {
        Value v = eval(*s.expr, scope);
        if (s.target_obj) {
          Value obj = eval(*s.target_obj, scope);
          if (!obj.is_dict() || !obj.dict_ref().is_namespace)
            throw RenderError("cannot assign attribute on non-namespace object");
          obj.dict_ref().set(s.attr, v);
        } else {
          unpack(scope, s.targets, v);
        }
        return Flow::Normal;
      }
      case Stmt::SetBlock: {
        std::string captured;
        exec(s.bodies[0], scope, captured);
        scope.set(s.targets[0], Value(captured));
        return Flow::Normal;
      }
      case Stmt::Macro: scope.set(s.name, make_macro(s)); return Flow::Normal;
      case Stmt::Break: return Flow::Break;
      case Stmt::Continue: return Flow::Continue;
      case Stmt::Passthrough: return exec(s.bodies[0], scope, out);
    }
  } catch (const RenderError& e) {
    error(s.loc, e.what());
  } catch (const std::runtime_error& e) {
    if (dynamic_cast<const Error*>(&e)) throw;
    error(s.loc, e.what());
  }
  return Flow::Normal;
}

Value Interp::eval(const Expr& e, Scope& scope) {
  try {
    Frame frame(*this);
    return eval_inner(e, scope);
  } catch (const RenderError& err) {
    error(e.loc, err.what());
  } catch (const Error&) {
    throw;
  } catch (const std::runtime_error& err) {
    error(e.loc, err.what());
  }
}

static CallArgs eval_args(Interp& in, const Expr& e, size_t first, Scope& scope,
                          const std::function<Value(const Expr&, Scope&)>& ev) {
  CallArgs a;
  for (size_t i = first; i < e.args.size(); i++) a.args.push_back(ev(*e.args[i], scope));
  for (size_t i = 0; i < e.kwargs.size(); i++) a.kwargs.emplace_back(e.kwnames[i], ev(*e.kwargs[i], scope));
  (void)in;
  return a;
}

Value Interp::eval_inner(const Expr& e, Scope& scope) {
  auto ev = [this](const Expr& x, Scope& s) { return eval(x, s); };
  switch (e.kind) {
    case Expr::Literal: return e.literal;
    case Expr::Name: {
      Value* v = scope.find(e.name);
      return v ? *v : Value();
    }
    case Expr::ListLit: case Expr::TupleLit: {
      List l;
      for (const auto& a : e.args) l.push_back(eval(*a, scope));
      return e.kind == Expr::TupleLit ? Value::tuple(std::move(l)) : Value::list(std::move(l));
    }
    case Expr::DictLit: {
      Value d = Value::dict();
      for (size_t i = 0; i < e.args.size(); i++) {
        Value k = eval(*e.args[i], scope);
        if (!k.is_string()) throw RenderError("only string keys are supported in dict literals");
        d.dict_ref().set(k.str(), eval(*e.kwargs[i], scope));
      }
      return d;
    }
    case Expr::Attr: {
      Value obj = eval(*e.args[0], scope);
      if (obj.is_undefined()) {
        std::string what = e.args[0]->kind == Expr::Name ? "'" + e.args[0]->name + "' is undefined"
                                                         : "undefined value has no attribute '" + e.name + "'";
        throw RenderError(what);
      }
      return get_attr(obj, e.name);
    }
    case Expr::Item: {
      Value obj = eval(*e.args[0], scope);
      Value key = eval(*e.args[1], scope);
      if (obj.is_undefined()) {
        std::string what = e.args[0]->kind == Expr::Name ? "'" + e.args[0]->name + "' is undefined"
                                                         : "undefined value is not subscriptable";
        throw RenderError(what);
      }
      return get_item(obj, key);
    }
    case Expr::Slice: {
      Value obj = eval(*e.args[0], scope);
      Value p[3];
      for (int k = 0; k < 3; k++)
        if (e.args[size_t(k) + 1]) p[k] = eval(*e.args[size_t(k) + 1], scope);
      return slice_value(obj, p[0], p[1], p[2]);
    }
    case Expr::Call: {
      Value callee = eval(*e.args[0], scope);
      if (!callee.is_function()) {
        std::string what = e.args[0]->kind == Expr::Name ? "'" + e.args[0]->name + "'" : "value";
        throw RenderError(what + (callee.is_undefined() ? " is undefined" : " is not callable"));
      }
      CallArgs a = eval_args(*this, e, 1, scope, ev);
      return callee.fn()(a);
    }
    case Expr::Filter: {
      Value input = eval(*e.args[0], scope);
      CallArgs a = eval_args(*this, e, 1, scope, ev);
      return apply_filter(e.name, input, a, e.loc);
    }
    case Expr::Test: {
      Value v;
      // `x is defined` must not fail on undefined attribute chains.
      if (e.name == "defined" || e.name == "undefined") {
        try { v = eval_inner(*e.args[0], scope); } catch (const RenderError&) { v = Value(); } catch (const Error&) { v = Value(); }
      } else {
        v = eval(*e.args[0], scope);
      }
      CallArgs a = eval_args(*this, e, 1, scope, ev);
      bool r = apply_test(e.name, v, a, e.loc);
      return Value(e.negated ? !r : r);
    }
    case Expr::Neg: {
      Value v = eval(*e.args[0], scope);
      if (v.is_int() || v.is_bool()) {
        if (v.as_int() == INT64_MIN) throw RenderError("integer overflow in unary - (results must fit in 64 bits)");
        return Value(-v.as_int());
      }
      if (v.is_float()) return Value(-v.as_float());
      throw RenderError(std::string("bad operand type for unary -: '") + v.type_name() + "'");
    }
    case Expr::Pos: return eval(*e.args[0], scope);
    case Expr::Not: return Value(!eval(*e.args[0], scope).truthy());
    case Expr::And: {
      Value l = eval(*e.args[0], scope);
      return l.truthy() ? eval(*e.args[1], scope) : l;
    }
    case Expr::Or: {
      Value l = eval(*e.args[0], scope);
      return l.truthy() ? l : eval(*e.args[1], scope);
    }
    case Expr::Cond: {
      if (eval(*e.args[1], scope).truthy()) return eval(*e.args[0], scope);
      return e.args[2] ? eval(*e.args[2], scope) : Value();
    }
    case Expr::Binary: {
      Value l = eval(*e.args[0], scope);
      Value r = eval(*e.args[1], scope);
      return binary_op(e.name, l, r);
    }
    case Expr::Compare: {
      Value l = eval(*e.args[0], scope);
      for (size_t i = 0; i < e.ops.size(); i++) {
        Value r = eval(*e.args[i + 1], scope);
        const std::string& op = e.ops[i];
        bool ok;
        if (op == "==") ok = l.equals(r);
        else if (op == "!=") ok = !l.equals(r);
        else if (op == "in") ok = contains(r, l);
        else if (op == "not in") ok = !contains(r, l);
        else {
          int c = compare(l, r);
          ok = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
        }
        if (!ok) return Value(false);
        l = r;
      }
      return Value(true);
    }
  }
  return Value();
}

}  // namespace trellm::jinja
