// Builtin filters, tests, global functions and str/dict methods, with Python/Jinja semantics.
#include <algorithm>
#include <climits>
#include <cmath>
#include <ctime>

#include "runtime/jinja/interp.h"
#include "runtime/unicode.h"

namespace trellm::jinja {
namespace {

std::vector<uint32_t> to_cps(const std::string& s) {
  std::vector<uint32_t> v;
  for (size_t i = 0; i < s.size();) v.push_back(utf8_next(s, i));
  return v;
}
std::string from_cps(const std::vector<uint32_t>& v, size_t b, size_t e) {
  std::string s;
  for (size_t i = b; i < e; i++) utf8_append(s, v[i]);
  return s;
}
// Python's str.isspace (White_Space plus the information separators \x1c-\x1f).
bool py_space(uint32_t c) { return is_unicode_whitespace(c) || (c >= 0x1c && c <= 0x1f); }

std::string py_strip(const std::string& s, const Value& chars, bool left, bool right) {
  std::vector<uint32_t> v = to_cps(s);
  std::vector<uint32_t> set;
  bool custom = chars.is_string();
  if (custom) set = to_cps(chars.str());
  auto strip_it = [&](uint32_t c) { return custom ? std::find(set.begin(), set.end(), c) != set.end() : py_space(c); };
  size_t b = 0, e = v.size();
  if (left) while (b < e && strip_it(v[b])) b++;
  if (right) while (e > b && strip_it(v[e - 1])) e--;
  return from_cps(v, b, e);
}

std::string ascii_case(std::string s, bool upper) {
  // Case mapping of ASCII plus Latin-1/Greek/Cyrillic basic ranges would need Unicode tables; templates only
  // case-map role names and keywords.
  for (auto& c : s) c = char(upper ? std::toupper((unsigned char)c) : std::tolower((unsigned char)c));
  return s;
}

Value py_split(const std::string& s, const Value& sep, int64_t maxsplit) {
  List out;
  if (sep.is_string()) {
    const std::string& d = sep.str();
    if (d.empty()) throw RenderError("empty separator");
    size_t pos = 0;
    int64_t n = 0;
    for (;;) {
      size_t k = s.find(d, pos);
      if (k == std::string::npos || (maxsplit >= 0 && n >= maxsplit)) break;
      out.push_back(Value(s.substr(pos, k - pos)));
      pos = k + d.size();
      n++;
    }
    out.push_back(Value(s.substr(pos)));
  } else {
    std::vector<uint32_t> v = to_cps(s);
    size_t i = 0;
    int64_t n = 0;
    while (i < v.size()) {
      while (i < v.size() && py_space(v[i])) i++;
      if (i >= v.size()) break;
      if (maxsplit >= 0 && n >= maxsplit) {
        size_t e = v.size();
        while (e > i && py_space(v[e - 1])) e--;
        out.push_back(Value(from_cps(v, i, e)));
        break;
      }
      size_t j = i;
      while (j < v.size() && !py_space(v[j])) j++;
      out.push_back(Value(from_cps(v, i, j)));
      n++;
      i = j;
    }
  }
  return Value::list(std::move(out));
}

std::string py_replace(const std::string& s, const std::string& a, const std::string& b, int64_t count) {
  std::string out;
  if (a.empty()) {  // Python inserts b between characters (and at both ends)
    std::vector<uint32_t> v = to_cps(s);
    int64_t n = 0;
    for (size_t i = 0; i <= v.size(); i++) {
      if (count < 0 || n < count) { out += b; n++; }
      if (i < v.size()) utf8_append(out, v[i]);
    }
    return out;
  }
  size_t pos = 0;
  int64_t n = 0;
  for (;;) {
    size_t k = s.find(a, pos);
    if (k == std::string::npos || (count >= 0 && n >= count)) break;
    out.append(s, pos, k - pos);
    out += b;
    pos = k + a.size();
    n++;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

bool starts_or_ends(const std::string& s, const Value& arg, bool starts) {
  auto one = [&](const std::string& p) {
    if (p.size() > s.size()) return false;
    return starts ? s.compare(0, p.size(), p) == 0 : s.compare(s.size() - p.size(), p.size(), p) == 0;
  };
  if (arg.is_string()) return one(arg.str());
  if (arg.is_list()) {
    for (const auto& v : arg.items())
      if (v.is_string() && one(v.str())) return true;
    return false;
  }
  throw RenderError("startswith/endswith expects a string or a tuple of strings");
}

Value method(const Value& obj, const std::string& name) {
  auto bind = [&](std::function<Value(const Value&, CallArgs&)> f) {
    Value self = obj;
    return Value::function([self, f](CallArgs& a) { return f(self, a); }, name);
  };
  if (obj.is_string()) {
    if (name == "upper" || name == "lower")
      return bind([up = name == "upper"](const Value& s, CallArgs&) { return Value(ascii_case(s.str(), up)); });
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return bind([name](const Value& s, CallArgs& a) {
        return Value(py_strip(s.str(), a.get(0, "chars"), name != "rstrip", name != "lstrip"));
      });
    if (name == "startswith" || name == "endswith")
      return bind([st = name == "startswith"](const Value& s, CallArgs& a) { return Value(starts_or_ends(s.str(), a.get(0, "prefix"), st)); });
    if (name == "split")
      return bind([](const Value& s, CallArgs& a) {
        Value m = a.get(1, "maxsplit", Value(-1));
        return py_split(s.str(), a.get(0, "sep"), m.as_int());
      });
    if (name == "replace")
      return bind([](const Value& s, CallArgs& a) {
        Value x = a.get(0, "old"), y = a.get(1, "new");
        if (!x.is_string() || !y.is_string()) throw RenderError("replace() arguments must be strings");
        return Value(py_replace(s.str(), x.str(), y.str(), a.get(2, "count", Value(-1)).as_int()));
      });
    if (name == "find" || name == "count" || name == "index" || name == "rfind")
      return bind([name](const Value& s, CallArgs& a) -> Value {
        Value x = a.get(0, "sub");
        if (!x.is_string()) throw RenderError(name + "() argument must be a string");
        if (name == "count") {
          if (x.str().empty()) return Value(int64_t(to_cps(s.str()).size() + 1));
          int64_t n = 0;
          for (size_t k = s.str().find(x.str()); k != std::string::npos; k = s.str().find(x.str(), k + x.str().size())) n++;
          return Value(n);
        }
        size_t k = name == "rfind" ? s.str().rfind(x.str()) : s.str().find(x.str());
        if (k == std::string::npos) {
          if (name == "index") throw RenderError("substring not found");
          return Value(-1);
        }
        return Value(int64_t(to_cps(s.str().substr(0, k)).size()));
      });
    if (name == "join")
      return bind([](const Value& s, CallArgs& a) {
        std::string out;
        bool first = true;
        for (const auto& v : iterate(a.get(0, "iterable"))) {
          if (!v.is_string()) throw RenderError("sequence item: expected str instance");
          if (!first) out += s.str();
          out += v.str();
          first = false;
        }
        return Value(out);
      });
    if (name == "title" || name == "capitalize")
      return bind([name](const Value& s, CallArgs&) {
        std::string r = s.str();
        bool start = true;
        for (auto& c : r) {
          bool alpha = std::isalpha((unsigned char)c);
          if (name == "capitalize") { c = char(start ? std::toupper((unsigned char)c) : std::tolower((unsigned char)c)); start = false; continue; }
          c = char(start && alpha ? std::toupper((unsigned char)c) : std::tolower((unsigned char)c));
          start = !alpha;
        }
        return Value(r);
      });
    if (name == "splitlines")
      return bind([](const Value& s, CallArgs&) {
        List out;
        std::string cur;
        const std::string& t = s.str();
        for (size_t i = 0; i < t.size(); i++) {
          if (t[i] == '\n' || t[i] == '\r') {
            out.push_back(Value(cur));
            cur.clear();
            if (t[i] == '\r' && i + 1 < t.size() && t[i + 1] == '\n') i++;
          } else {
            cur += t[i];
          }
        }
        if (!cur.empty()) out.push_back(Value(cur));
        return Value::list(std::move(out));
      });
    if (name == "isdigit" || name == "isalpha" || name == "isspace" || name == "isalnum" || name == "islower" || name == "isupper")
      return bind([name](const Value& s, CallArgs&) {
        const std::string& t = s.str();
        if (t.empty()) return Value(false);
        bool cased = false;
        for (unsigned char c : t) {
          if (name == "isdigit" && !std::isdigit(c)) return Value(false);
          if (name == "isalpha" && !std::isalpha(c)) return Value(false);
          if (name == "isalnum" && !std::isalnum(c)) return Value(false);
          if (name == "isspace" && !std::isspace(c)) return Value(false);
          if (name == "islower" && std::isupper(c)) return Value(false);
          if (name == "isupper" && std::islower(c)) return Value(false);
          if (std::isalpha(c)) cased = true;
        }
        return Value(name == "islower" || name == "isupper" ? cased : true);
      });
  }
  if (obj.is_dict()) {
    if (name == "items" || name == "keys" || name == "values")
      return bind([name](const Value& d, CallArgs&) {
        List out;
        for (const auto& [k, v] : d.dict_ref().entries) {
          if (name == "items") out.push_back(Value::tuple({Value(k), v}));
          else out.push_back(name == "keys" ? Value(k) : v);
        }
        return Value::list(std::move(out));
      });
    if (name == "get")
      return bind([](const Value& d, CallArgs& a) {
        Value k = a.get(0, "key");
        const Value* v = k.is_string() ? d.dict_ref().find(k.str()) : nullptr;
        return v ? *v : a.get(1, "default", Value::none());
      });
  }
  return Value();
}

}  // namespace

size_t py_len(const Value& v) {
  if (v.is_string()) return to_cps(v.str()).size();
  if (v.is_list()) return v.items().size();
  if (v.is_dict()) return v.dict_ref().entries.size();
  if (v.is_undefined()) return 0;
  throw RenderError(std::string("object of type '") + v.type_name() + "' has no len()");
}

std::vector<Value> iterate(const Value& v) {
  if (v.is_list()) return v.items();
  if (v.is_dict()) {
    std::vector<Value> keys;
    for (const auto& e : v.dict_ref().entries) keys.push_back(Value(e.first));
    return keys;
  }
  if (v.is_string()) {
    std::vector<Value> out;
    for (uint32_t c : to_cps(v.str())) { std::string s; utf8_append(s, c); out.push_back(Value(s)); }
    return out;
  }
  if (v.is_undefined()) return {};
  throw RenderError(std::string("'") + v.type_name() + "' object is not iterable");
}

Value get_attr(const Value& obj, const std::string& name) {
  Value m = method(obj, name);
  if (!m.is_undefined()) return m;
  if (obj.is_dict()) {
    const Value* v = obj.dict_ref().find(name);
    return v ? *v : Value();
  }
  return Value();
}

Value get_item(const Value& obj, const Value& key) {
  if (obj.is_dict()) {
    if (!key.is_string()) return Value();
    const Value* v = obj.dict_ref().find(key.str());
    return v ? *v : Value();
  }
  if ((obj.is_list() || obj.is_string()) && (key.is_int() || key.is_bool())) {
    int64_t i = key.as_int();
    if (obj.is_list()) {
      int64_t n = int64_t(obj.items().size());
      if (i < 0) i += n;
      return i >= 0 && i < n ? obj.items()[size_t(i)] : Value();
    }
    std::vector<uint32_t> v = to_cps(obj.str());
    int64_t n = int64_t(v.size());
    if (i < 0) i += n;
    return i >= 0 && i < n ? Value(from_cps(v, size_t(i), size_t(i) + 1)) : Value();
  }
  if (key.is_string()) return get_attr(obj, key.str());
  return Value();
}

Value slice_value(const Value& obj, const Value& a, const Value& b, const Value& c) {
  int64_t step = c.is_undefined() || c.is_none() ? 1 : c.as_int();
  if (step == 0) throw RenderError("slice step cannot be zero");
  std::vector<uint32_t> cps;
  int64_t n;
  if (obj.is_list()) n = int64_t(obj.items().size());
  else if (obj.is_string()) { cps = to_cps(obj.str()); n = int64_t(cps.size()); }
  else throw RenderError(std::string("'") + obj.type_name() + "' object is not subscriptable");
  auto norm = [&](const Value& v, int64_t dflt) -> int64_t {
    if (v.is_undefined() || v.is_none()) return dflt;
    int64_t i = v.as_int();
    if (i < 0) i += n;
    if (step > 0) return std::clamp<int64_t>(i, 0, n);
    return std::clamp<int64_t>(i, -1, n - 1);
  };
  int64_t lo = norm(a, step > 0 ? 0 : n - 1), hi = norm(b, step > 0 ? n : -1);
  List out;
  std::string s;
  for (int64_t i = lo; step > 0 ? i < hi : i > hi;) {
    if (obj.is_list()) out.push_back(obj.items()[size_t(i)]);
    else utf8_append(s, cps[size_t(i)]);
    if (__builtin_add_overflow(i, step, &i)) break;  // a huge step: past the end
  }
  return obj.is_list() ? Value::list(std::move(out)) : Value(s);
}

bool contains(const Value& c, const Value& item) {
  if (c.is_string()) {
    if (!item.is_string()) throw RenderError("'in <string>' requires string as left operand");
    return c.str().find(item.str()) != std::string::npos;
  }
  if (c.is_list()) {
    for (const auto& v : c.items())
      if (v.equals(item)) return true;
    return false;
  }
  if (c.is_dict()) return item.is_string() && c.dict_ref().find(item.str()) != nullptr;
  if (c.is_undefined()) return false;
  throw RenderError(std::string("argument of type '") + c.type_name() + "' is not iterable");
}

namespace {
// Python's ints do not overflow; ours are 64-bit, so a result that does not fit is an error (not undefined
// behaviour). Strings and lists built by + ~ * stay within kMaxRenderBytes / items.
int64_t int_op(char op, int64_t x, int64_t y) {
  int64_t r = 0;
  const bool over = op == '+' ? __builtin_add_overflow(x, y, &r) : op == '-' ? __builtin_sub_overflow(x, y, &r)
                                                                            : __builtin_mul_overflow(x, y, &r);
  if (over) throw RenderError(std::string("integer overflow in ") + op + " (results must fit in 64 bits)");
  return r;
}
void check_size(size_t n, const char* what) {
  if (n > kMaxRenderBytes) throw RenderError(std::string(what) + " would exceed " + std::to_string(kMaxRenderBytes >> 20) + " MB");
}
}  // namespace

Value binary_op(const std::string& op, const Value& a, const Value& b) {
  if (op == "~") {
    std::string l = a.to_str(), r = b.to_str();
    check_size(l.size() + r.size(), "the string");
    return Value(l + r);
  }
  auto type_error = [&]() -> RenderError {
    return RenderError("unsupported operand type(s) for " + op + ": '" + a.type_name() + "' and '" + b.type_name() + "'");
  };
  if (a.is_undefined() || b.is_undefined()) throw RenderError("operation on an undefined value");
  if (op == "+") {
    if (a.is_string() && b.is_string()) {
      check_size(a.str().size() + b.str().size(), "the string");
      return Value(a.str() + b.str());
    }
    if (a.is_list() && b.is_list()) {
      check_size(a.items().size() + b.items().size(), "the list (in items)");
      List l = a.items();
      l.insert(l.end(), b.items().begin(), b.items().end());
      return Value::list(std::move(l));
    }
  }
  if (op == "*") {
    const Value* s = a.is_string() || a.is_list() ? &a : b.is_string() || b.is_list() ? &b : nullptr;
    const Value* n = s == &a ? &b : &a;
    if (s && (n->is_int() || n->is_bool())) {
      int64_t k = std::max<int64_t>(0, n->as_int());
      const size_t unit = s->is_string() ? s->str().size() : s->items().size();
      if (unit && uint64_t(k) > kMaxRenderBytes / unit) check_size(kMaxRenderBytes + 1, s->is_string() ? "the string" : "the list (in items)");
      if (s->is_string()) { std::string r; for (int64_t i = 0; i < k; i++) r += s->str(); return Value(r); }
      List r;
      for (int64_t i = 0; i < k; i++) r.insert(r.end(), s->items().begin(), s->items().end());
      return Value::list(std::move(r));
    }
  }
  if (op == "%" && a.is_string()) {
    // printf-style formatting with %s / %d / %%: enough for templates that use it.
    std::vector<Value> vals = b.is_list() ? b.items() : std::vector<Value>{b};
    std::string out;
    size_t k = 0;
    const std::string& f = a.str();
    for (size_t i = 0; i < f.size(); i++) {
      if (f[i] != '%' || i + 1 >= f.size()) { out += f[i]; continue; }
      char c = f[++i];
      if (c == '%') { out += '%'; continue; }
      if (k >= vals.size()) throw RenderError("not enough arguments for format string");
      const Value& v = vals[k++];
      if (c == 's') out += v.to_str();
      else if (c == 'd' || c == 'i') out += std::to_string(v.as_int());
      else if (c == 'r') out += v.repr();
      else throw RenderError(std::string("unsupported format character '") + c + "'");
    }
    return Value(out);
  }
  if (!a.is_number() || !b.is_number()) throw type_error();
  bool fl = a.is_float() || b.is_float();
  if (op == "/") {
    if (b.as_float() == 0) throw RenderError("division by zero");
    return Value(a.as_float() / b.as_float());
  }
  if (op == "**") {
    if (!fl && b.as_int() >= 0) {  // by squaring: 2 ** 10**18 must not loop 10**18 times
      int64_t r = 1, base = a.as_int();
      for (int64_t e = b.as_int(); e > 0; e >>= 1) {
        if (e & 1) r = int_op('*', r, base);
        if (e > 1) base = int_op('*', base, base);
      }
      return Value(r);
    }
    return Value(std::pow(a.as_float(), b.as_float()));
  }
  if (fl) {
    double x = a.as_float(), y = b.as_float();
    if (op == "+") return Value(x + y);
    if (op == "-") return Value(x - y);
    if (op == "*") return Value(x * y);
    if (y == 0) throw RenderError("division by zero");
    if (op == "//") return Value(std::floor(x / y));
    if (op == "%") { double m = std::fmod(x, y); if (m != 0 && ((m < 0) != (y < 0))) m += y; return Value(m); }
  } else {
    int64_t x = a.as_int(), y = b.as_int();
    if (op == "+" || op == "-" || op == "*") return Value(int_op(op[0], x, y));
    if (y == 0) throw RenderError("integer division or modulo by zero");
    if (x == INT64_MIN && y == -1) throw RenderError("integer overflow in " + op + " (results must fit in 64 bits)");
    int64_t q = x / y, m = x % y;
    if (m != 0 && ((m < 0) != (y < 0))) { q--; m += y; }  // Python floors
    if (op == "//") return Value(q);
    if (op == "%") return Value(m);
  }
  throw type_error();
}

void install_globals(Scope& g) {
  g.set("namespace", Value::function([](CallArgs& a) {
          Value ns = Value::dict();
          ns.dict_ref().is_namespace = true;
          if (!a.args.empty() && a.args[0].is_dict())
            for (const auto& [k, v] : a.args[0].dict_ref().entries) ns.dict_ref().set(k, v);
          for (const auto& [k, v] : a.kwargs) ns.dict_ref().set(k, v);
          return ns;
        }, "namespace"));
  g.set("range", Value::function([](CallArgs& a) {
          int64_t start = 0, stop, step = 1;
          if (a.args.size() == 1) stop = a.args[0].as_int();
          else if (a.args.size() >= 2) { start = a.args[0].as_int(); stop = a.args[1].as_int(); if (a.args.size() > 2) step = a.args[2].as_int(); }
          else throw RenderError("range expected at least 1 argument");
          if (step == 0) throw RenderError("range() arg 3 must not be zero");
          List l;
          for (int64_t i = start; step > 0 ? i < stop : i > stop;) {
            l.push_back(Value(i));
            if (l.size() > 1000000) throw RenderError("range too large");
            if (__builtin_add_overflow(i, step, &i)) break;  // past INT64_MAX / MIN: past stop too
          }
          return Value::list(std::move(l));
        }, "range"));
  g.set("dict", Value::function([](CallArgs& a) {
          Value d = Value::dict();
          for (const auto& [k, v] : a.kwargs) d.dict_ref().set(k, v);
          return d;
        }, "dict"));
  // transformers' globals.
  g.set("raise_exception", Value::function([](CallArgs& a) -> Value {
          throw RenderError("raise_exception: " + a.get(0, "message").to_str());
        }, "raise_exception"));
  g.set("strftime_now", Value::function([](CallArgs& a) {
          std::time_t t = std::time(nullptr);
          std::tm tm{};
          localtime_r(&t, &tm);
          char buf[256];
          size_t n = std::strftime(buf, sizeof(buf), a.get(0, "format").to_str().c_str(), &tm);
          return Value(std::string(buf, n));
        }, "strftime_now"));
}

}  // namespace trellm::jinja
