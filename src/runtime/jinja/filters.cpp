// Jinja filters and tests, with transformers' tojson override.
#include <algorithm>
#include <charconv>
#include <climits>
#include <cmath>

#include "core/error.h"
#include "runtime/jinja/interp.h"
#include "runtime/unicode.h"

namespace trellm::jinja {
namespace {

std::string strip_ws(const std::string& s) {
  std::vector<uint32_t> v;
  for (size_t i = 0; i < s.size();) v.push_back(utf8_next(s, i));
  auto sp = [](uint32_t c) { return is_unicode_whitespace(c) || (c >= 0x1c && c <= 0x1f); };
  size_t b = 0, e = v.size();
  while (b < e && sp(v[b])) b++;
  while (e > b && sp(v[e - 1])) e--;
  std::string out;
  for (size_t i = b; i < e; i++) utf8_append(out, v[i]);
  return out;
}

// Attribute path "a.b" or item index, as Jinja's make_attrgetter.
Value attr_path(const Value& v, const Value& attr) {
  if (attr.is_int()) return get_item(v, attr);
  Value cur = v;
  std::string path = attr.to_str();
  size_t pos = 0;
  for (;;) {
    size_t dot = path.find('.', pos);
    std::string part = path.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos);
    bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit((unsigned char)c); });
    int64_t index = 0;
    if (numeric && std::from_chars(part.data(), part.data() + part.size(), index).ec != std::errc())
      throw RenderError("attribute index " + part + " is out of range");  // std::stoll threw out_of_range
    cur = numeric ? get_item(cur, Value(index)) : get_item(cur, Value(part));
    if (dot == std::string::npos) return cur;
    pos = dot + 1;
  }
}

CallArgs shift_args(const CallArgs& a, size_t k) {
  CallArgs r;
  for (size_t i = k; i < a.args.size(); i++) r.args.push_back(a.args[i]);
  r.kwargs = a.kwargs;
  return r;
}

}  // namespace

Value Interp::apply_filter(const std::string& name, const Value& in, CallArgs& a, const Loc& loc) {
  if (name == "tojson") {
    // transformers: json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    Value indent = a.get(1, "indent", Value::none());
    if (a.has(0, "ensure_ascii") && a.get(0, "ensure_ascii").truthy())
      throw RenderError("tojson(ensure_ascii=True) is not supported");
    Value seps = a.get(2, "separators", Value::none());
    bool sort = a.get(3, "sort_keys", Value(false)).truthy();
    int ind = indent.is_none() ? -1 : int(indent.as_int());
    std::string item_sep = ind >= 0 ? "," : ", ", key_sep = ": ";
    if (seps.is_list() && seps.items().size() == 2) {
      item_sep = seps.items()[0].to_str();
      key_sep = seps.items()[1].to_str();
    }
    return Value(in.to_json(ind, item_sep, key_sep, sort));
  }
  if (name == "length" || name == "count") return Value(int64_t(py_len(in)));
  if (name == "string") return Value(in.to_str());
  if (name == "safe" || name == "e" || name == "escape" || name == "forceescape") {
    if (name == "safe") return in;
    // autoescape is off in HF's environment, so escape still escapes explicitly.
    std::string out;
    for (char c : in.to_str()) {
      switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&#34;"; break;
        case '\'': out += "&#39;"; break;
        default: out += c;
      }
    }
    return Value(out);
  }
  if (name == "trim") {
    if (a.has(0, "chars")) return get_attr(Value(in.to_str()), "strip").fn()(a);
    return Value(strip_ws(in.to_str()));
  }
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
    CallArgs none;
    return get_attr(Value(in.to_str()), name).fn()(none);
  }
  if (name == "replace") {
    Value s(in.to_str());
    return get_attr(s, "replace").fn()(a);
  }
  if (name == "default" || name == "d") {
    bool boolean = a.get(1, "boolean", Value(false)).truthy();
    if (in.is_undefined() || (boolean && !in.truthy())) return a.get(0, "default_value", Value(""));
    return in;
  }
  if (name == "join") {
    std::string sep = a.get(0, "d", Value("")).to_str();
    Value attr = a.get(1, "attribute");
    std::string out;
    bool first = true;
    for (const auto& v : iterate(in)) {
      if (!first) out += sep;
      out += (attr.is_undefined() ? v : attr_path(v, attr)).to_str();
      first = false;
    }
    return Value(out);
  }
  if (name == "first" || name == "last") {
    std::vector<Value> items = iterate(in);
    if (items.empty()) return Value();
    return name == "first" ? items.front() : items.back();
  }
  if (name == "items") {
    if (in.is_undefined()) return Value::list();
    if (!in.is_dict()) throw RenderError("items filter expects a mapping");
    CallArgs none;
    return get_attr(in, "items").fn()(none);
  }
  if (name == "list") return Value::list(iterate(in));
  if (name == "reverse") {
    if (in.is_string()) return slice_value(in, Value(), Value(), Value(-1));
    std::vector<Value> v = iterate(in);
    std::reverse(v.begin(), v.end());
    return Value::list(std::move(v));
  }
  if (name == "int" || name == "float") {
    Value dflt = a.get(0, "default", name == "int" ? Value(0) : Value(0.0));
    double f;
    if (in.is_number()) f = in.as_float();
    else if (in.is_string()) {
      try {
        size_t used = 0;
        std::string s = strip_ws(in.str());
        f = std::stod(s, &used);
        if (used != s.size()) return dflt;
      } catch (const std::exception&) {
        return dflt;
      }
    } else {
      return dflt;
    }
    if (name == "int") return in.is_int() ? in : Value(Value::float_to_int(f));
    return Value(f);
  }
  if (name == "abs") {
    if (in.is_float()) return Value(std::fabs(in.as_float()));
    if (in.is_number()) {
      if (in.as_int() == INT64_MIN) throw RenderError("integer overflow in abs() (results must fit in 64 bits)");
      return Value(int64_t(in.as_int() < 0 ? -in.as_int() : in.as_int()));
    }
    throw RenderError("bad operand type for abs()");
  }
  if (name == "round") {
    int64_t prec = a.get(0, "precision", Value(0)).as_int();
    std::string method = a.get(1, "method", Value("common")).to_str();
    double m = std::pow(10.0, double(prec)), x = in.as_float() * m;
    double r = method == "ceil" ? std::ceil(x) : method == "floor" ? std::floor(x) : std::round(x);
    return Value(r / m);
  }
  if (name == "sum") {
    Value attr = a.get(0, "attribute");
    Value total = a.get(1, "start", Value(0));
    for (const auto& v : iterate(in)) total = binary_op("+", total, attr.is_undefined() ? v : attr_path(v, attr));
    return total;
  }
  if (name == "min" || name == "max" || name == "sort" || name == "unique" || name == "dictsort") {
    if (name == "dictsort") {
      if (!in.is_dict()) throw RenderError("dictsort expects a mapping");
      std::vector<Value> items;
      for (const auto& [k, v] : in.dict_ref().entries) items.push_back(Value::tuple({Value(k), v}));
      bool by_value = a.get(1, "by", Value("key")).to_str() == "value";
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
        return compare(x.items()[by_value ? 1 : 0], y.items()[by_value ? 1 : 0]) < 0;
      });
      if (a.get(2, "reverse", Value(false)).truthy()) std::reverse(items.begin(), items.end());
      return Value::list(std::move(items));
    }
    std::vector<Value> v = iterate(in);
    Value attr = a.get(name == "sort" ? 2 : 1, "attribute");
    auto key = [&](const Value& x) { return attr.is_undefined() ? x : attr_path(x, attr); };
    if (name == "unique") {
      std::vector<Value> out;
      for (const auto& x : v) {
        bool seen = false;
        for (const auto& y : out) if (key(y).equals(key(x))) { seen = true; break; }
        if (!seen) out.push_back(x);
      }
      return Value::list(std::move(out));
    }
    if (name == "sort") {
      bool rev = a.get(0, "reverse", Value(false)).truthy();
      std::stable_sort(v.begin(), v.end(), [&](const Value& x, const Value& y) { return compare(key(x), key(y)) < 0; });
      if (rev) std::reverse(v.begin(), v.end());
      return Value::list(std::move(v));
    }
    if (v.empty()) return Value();
    Value best = v[0];
    for (const auto& x : v)
      if ((name == "min") ? compare(key(x), key(best)) < 0 : compare(key(x), key(best)) > 0) best = x;
    return best;
  }
  if (name == "map") {
    std::vector<Value> out;
    Value attr = a.get(99, "attribute");
    for (const auto& v : iterate(in)) {
      if (!attr.is_undefined()) {
        Value r = attr_path(v, attr);
        if (r.is_undefined() && a.has(99, "default")) r = a.get(99, "default");
        out.push_back(r);
      } else {
        if (a.args.empty()) throw RenderError("map needs a filter name or attribute=");
        CallArgs rest = shift_args(a, 1);
        out.push_back(apply_filter(a.args[0].to_str(), v, rest, loc));
      }
    }
    return Value::list(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    bool by_attr = name == "selectattr" || name == "rejectattr";
    bool want = name == "select" || name == "selectattr";
    size_t k = by_attr ? 1 : 0;
    std::vector<Value> out;
    for (const auto& v : iterate(in)) {
      Value x = by_attr ? attr_path(v, a.get(0, "attribute")) : v;
      bool r;
      if (a.args.size() > k) {
        CallArgs rest = shift_args(a, k + 1);
        rest.kwargs.clear();
        r = apply_test(a.args[k].to_str(), x, rest, loc);
      } else {
        r = x.truthy();
      }
      if (r == want) out.push_back(v);
    }
    return Value::list(std::move(out));
  }
  if (name == "indent") {
    Value w = a.get(0, "width", Value(4));
    std::string pad = w.is_string() ? w.str() : std::string(size_t(std::max<int64_t>(0, w.as_int())), ' ');
    bool first = a.get(1, "first", Value(false)).truthy(), blank = a.get(2, "blank", Value(false)).truthy();
    std::string s = in.to_str(), out;
    size_t pos = 0;
    bool is_first = true;
    while (pos <= s.size()) {
      size_t nl = s.find('\n', pos);
      std::string line = s.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
      if ((!is_first || first) && (blank || !strip_ws(line).empty())) out += pad;
      out += line;
      if (nl == std::string::npos) break;
      out += '\n';
      pos = nl + 1;
      is_first = false;
    }
    return Value(out);
  }
  if (name == "attr") return get_attr(in, a.get(0, "name").to_str());
  if (name == "format") {
    Value args = Value::list(a.args);
    return binary_op("%", Value(in.to_str()), args);
  }
  if (name == "wordcount") {
    CallArgs none;
    return Value(int64_t(iterate(get_attr(Value(in.to_str()), "split").fn()(none)).size()));
  }
  throw RenderError("unknown filter '" + name + "'");
}

bool Interp::apply_test(const std::string& name, const Value& v, CallArgs& a, const Loc& loc) {
  (void)loc;
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "string") return v.is_string();
  if (name == "number") return v.is_number();
  if (name == "integer") return v.is_int();
  if (name == "float") return v.is_float();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.as_bool();
  if (name == "false") return v.is_bool() && !v.as_bool();
  if (name == "mapping") return v.is_dict() && !v.dict_ref().is_namespace;
  if (name == "iterable") return v.is_list() || v.is_dict() || v.is_string();
  if (name == "sequence") return v.is_list() || v.is_dict() || v.is_string();
  if (name == "callable") return v.is_function();
  if (name == "odd" || name == "even") {
    if (!v.is_number()) throw RenderError("odd/even test needs a number");
    return (((v.as_int() % 2) + 2) % 2 == 1) == (name == "odd");
  }
  if (name == "divisibleby") {
    int64_t d = a.get(0, "num").as_int();
    if (d == 0) throw RenderError("division by zero");
    return v.as_int() % d == 0;
  }
  if (name == "eq" || name == "equalto" || name == "==") return v.equals(a.get(0, "other"));
  if (name == "ne" || name == "!=") return !v.equals(a.get(0, "other"));
  if (name == "sameas") {
    Value o = a.get(0, "other");
    if (v.kind() != o.kind()) return false;
    return v.is_none() || v.is_undefined() || v.is_bool() ? v.equals(o) : (v.is_list() || v.is_dict()) && v.equals(o);
  }
  if (name == "lt" || name == "<") return compare(v, a.get(0, "other")) < 0;
  if (name == "le" || name == "<=") return compare(v, a.get(0, "other")) <= 0;
  if (name == "gt" || name == ">" || name == "greaterthan") return compare(v, a.get(0, "other")) > 0;
  if (name == "ge" || name == ">=") return compare(v, a.get(0, "other")) >= 0;
  if (name == "in") return contains(a.get(0, "seq"), v);
  if (name == "lower" || name == "upper") {
    if (!v.is_string()) return false;
    CallArgs none;
    return get_attr(v, name == "lower" ? "islower" : "isupper").fn()(none).truthy();
  }
  throw RenderError("unknown test '" + name + "'");
}

}  // namespace trellm::jinja
