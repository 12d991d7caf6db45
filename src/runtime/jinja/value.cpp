#include "runtime/jinja/value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace trellm::jinja {

int64_t Value::float_to_int(double f) {
  // 2^63 is exactly representable; every double below it in magnitude (and -2^63 itself) converts.
  if (!(f >= -9223372036854775808.0 && f < 9223372036854775808.0))
    throw std::runtime_error("cannot convert float " + python_float_repr(f) + " to a 64-bit integer");
  return int64_t(f);
}

Value Value::list(List items) {
  Value v;
  v.kind_ = Kind::List;
  v.l_ = std::make_shared<List>(std::move(items));
  return v;
}

Value Value::tuple(List items) {
  Value v = list(std::move(items));
  v.tuple_ = true;
  return v;
}

Value Value::dict() {
  Value v;
  v.kind_ = Kind::Dict;
  v.d_ = std::make_shared<Dict>();
  return v;
}

Value Value::function(Function f, std::string name) {
  Value v;
  v.kind_ = Kind::Function;
  v.fn_ = std::make_shared<Function>(std::move(f));
  v.s_ = std::make_shared<std::string>(std::move(name));
  return v;
}

Value Value::from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null: return none();
    case nlohmann::json::value_t::boolean: return Value(j.get<bool>());
    case nlohmann::json::value_t::number_integer: return Value(j.get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: return Value(int64_t(j.get<uint64_t>()));
    case nlohmann::json::value_t::number_float: return Value(j.get<double>());
    case nlohmann::json::value_t::string: return Value(j.get<std::string>());
    case nlohmann::json::value_t::array: {
      List l;
      for (const auto& e : j) l.push_back(from_json(e));
      return list(std::move(l));
    }
    case nlohmann::json::value_t::object: {
      Value d = dict();
      for (auto it = j.begin(); it != j.end(); ++it) d.dict_ref().set(it.key(), from_json(it.value()));
      return d;
    }
    default: return Value();
  }
}

const Value* Dict::find(const std::string& k) const {
  for (const auto& e : entries)
    if (e.first == k) return &e.second;
  return nullptr;
}
Value* Dict::find(const std::string& k) {
  for (auto& e : entries)
    if (e.first == k) return &e.second;
  return nullptr;
}
void Dict::set(const std::string& k, Value v) {
  if (Value* p = find(k)) *p = std::move(v);
  else entries.emplace_back(k, std::move(v));
}

Value CallArgs::get(size_t i, const std::string& name, Value dflt) const {
  if (i < args.size()) return args[i];
  for (const auto& kw : kwargs)
    if (kw.first == name) return kw.second;
  return dflt;
}
bool CallArgs::has(size_t i, const std::string& name) const {
  if (i < args.size()) return true;
  for (const auto& kw : kwargs)
    if (kw.first == name) return true;
  return false;
}

bool Value::truthy() const {
  switch (kind_) {
    case Kind::Undefined: case Kind::None: return false;
    case Kind::Bool: case Kind::Int: return i_ != 0;
    case Kind::Float: return f_ != 0.0;
    case Kind::String: return !s_->empty();
    case Kind::List: return !l_->empty();
    case Kind::Dict: return !d_->entries.empty();
    case Kind::Function: return true;
  }
  return false;
}

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  // Shortest digits that round-trip, then Python's layout: scientific when exp < -4 or >= 16.
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  size_t e = sci.find('e');
  std::string mant = sci.substr(0, e);
  int exp = std::stoi(sci.substr(e + 1));
  bool neg = mant[0] == '-';
  if (neg) mant = mant.substr(1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  std::string out;
  if (exp < -4 || exp >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) {
      out += '.';
      out.append(digits, 1, std::string::npos);
    }
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  } else if (exp < 0) {
    out = "0.";
    out.append(size_t(-exp - 1), '0');
    out += digits;
  } else {
    if (digits.size() <= size_t(exp) + 1) {
      out = digits + std::string(size_t(exp) + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, size_t(exp) + 1) + "." + digits.substr(size_t(exp) + 1);
    }
  }
  return neg ? "-" + out : out;
}

static std::string py_str_repr(const std::string& s) {
  // Python picks single quotes unless the string contains ' and no ".
  bool has_sq = s.find('\'') != std::string::npos, has_dq = s.find('"') != std::string::npos;
  char q = (has_sq && !has_dq) ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == q || c == '\\') { out += '\\'; out += char(c); }
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) { char b[8]; std::snprintf(b, sizeof(b), "\\x%02x", c); out += b; }
    else out += char(c);
  }
  out += q;
  return out;
}

std::string Value::to_str() const {
  switch (kind_) {
    case Kind::Undefined: return "";
    case Kind::None: return "None";
    case Kind::Bool: return i_ ? "True" : "False";
    case Kind::Int: return std::to_string(i_);
    case Kind::Float: return python_float_repr(f_);
    case Kind::String: return *s_;
    default: return repr();
  }
}

std::string Value::repr() const {
  switch (kind_) {
    case Kind::String: return py_str_repr(*s_);
    case Kind::List: {
      std::string out = tuple_ ? "(" : "[";
      for (size_t i = 0; i < l_->size(); i++) out += (i ? ", " : "") + (*l_)[i].repr();
      if (tuple_ && l_->size() == 1) out += ",";
      return out + (tuple_ ? ")" : "]");
    }
    case Kind::Dict: {
      std::string out = "{";
      for (size_t i = 0; i < d_->entries.size(); i++)
        out += (i ? ", " : "") + py_str_repr(d_->entries[i].first) + ": " + d_->entries[i].second.repr();
      return out + "}";
    }
    case Kind::Function: return "<function " + *s_ + ">";
    default: return to_str();
  }
}

static void json_escape(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) { char b[8]; std::snprintf(b, sizeof(b), "\\u%04x", c); out += b; }
        else out += char(c);
    }
  }
  out += '"';
}

static void to_json_rec(const Value& v, std::string& out, int indent, int level, const std::string& item_sep,
                        const std::string& key_sep, bool sort_keys) {
  auto newline = [&](int lvl) {
    if (indent < 0) return;
    out += '\n';
    out.append(size_t(indent * lvl), ' ');
  };
  switch (v.kind()) {
    case Value::Kind::Undefined:
      throw std::runtime_error("Object of type Undefined is not JSON serializable");
    case Value::Kind::None: out += "null"; break;
    case Value::Kind::Bool: out += v.as_bool() ? "true" : "false"; break;
    case Value::Kind::Int: out += std::to_string(v.as_int()); break;
    case Value::Kind::Float: {
      double f = v.as_float();
      out += std::isnan(f) ? "NaN" : std::isinf(f) ? (f > 0 ? "Infinity" : "-Infinity") : python_float_repr(f);
      break;
    }
    case Value::Kind::String: json_escape(out, v.str()); break;
    case Value::Kind::List: {
      const List& l = v.items();
      if (l.empty()) { out += "[]"; break; }
      out += '[';
      for (size_t i = 0; i < l.size(); i++) {
        if (i) out += item_sep;
        newline(level + 1);
        to_json_rec(l[i], out, indent, level + 1, item_sep, key_sep, sort_keys);
      }
      newline(level);
      out += ']';
      break;
    }
    case Value::Kind::Dict: {
      std::vector<const std::pair<std::string, Value>*> es;
      for (const auto& e : v.dict_ref().entries) es.push_back(&e);
      if (sort_keys) std::stable_sort(es.begin(), es.end(), [](auto* a, auto* b) { return a->first < b->first; });
      if (es.empty()) { out += "{}"; break; }
      out += '{';
      for (size_t i = 0; i < es.size(); i++) {
        if (i) out += item_sep;
        newline(level + 1);
        json_escape(out, es[i]->first);
        out += key_sep;
        to_json_rec(es[i]->second, out, indent, level + 1, item_sep, key_sep, sort_keys);
      }
      newline(level);
      out += '}';
      break;
    }
    case Value::Kind::Function:
      throw std::runtime_error("Object of type function is not JSON serializable");
  }
}

std::string Value::to_json(int indent, const std::string& item_sep, const std::string& key_sep, bool sort_keys) const {
  std::string out;
  to_json_rec(*this, out, indent, 0, item_sep, key_sep, sort_keys);
  return out;
}

nlohmann::ordered_json Value::to_json_value() const {
  switch (kind_) {
    case Kind::None: case Kind::Undefined: return nullptr;
    case Kind::Bool: return as_bool();
    case Kind::Int: return i_;
    case Kind::Float: return f_;
    case Kind::String: return *s_;
    case Kind::List: {
      auto a = nlohmann::ordered_json::array();
      for (const auto& e : *l_) a.push_back(e.to_json_value());
      return a;
    }
    case Kind::Dict: {
      auto o = nlohmann::ordered_json::object();
      for (const auto& [k, e] : d_->entries) o[k] = e.to_json_value();
      return o;
    }
    default: return nullptr;
  }
}

const char* Value::type_name() const {
  switch (kind_) {
    case Kind::Undefined: return "Undefined";
    case Kind::None: return "NoneType";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::String: return "str";
    case Kind::List: return "list";
    case Kind::Dict: return d_->is_namespace ? "Namespace" : "dict";
    case Kind::Function: return "function";
  }
  return "?";
}

bool Value::equals(const Value& o) const {
  if (is_number() && o.is_number()) {
    if (is_float() || o.is_float()) return as_float() == o.as_float();
    return i_ == o.i_;
  }
  if (kind_ != o.kind_) return false;
  switch (kind_) {
    case Kind::Undefined: case Kind::None: return true;
    case Kind::String: return *s_ == *o.s_;
    case Kind::List: {
      if (l_->size() != o.l_->size()) return false;
      for (size_t i = 0; i < l_->size(); i++)
        if (!(*l_)[i].equals((*o.l_)[i])) return false;
      return true;
    }
    case Kind::Dict: {
      if (d_ == o.d_) return true;
      if (d_->entries.size() != o.d_->entries.size()) return false;
      for (const auto& [k, v] : d_->entries) {
        const Value* w = o.d_->find(k);
        if (!w || !v.equals(*w)) return false;
      }
      return true;
    }
    case Kind::Function: return fn_ == o.fn_;
    default: return false;
  }
}

int compare(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) {
      double x = a.as_float(), y = b.as_float();
      return x < y ? -1 : x > y ? 1 : 0;
    }
    return a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) {
    int c = a.str().compare(b.str());  // UTF-8 byte order is code point order, as Python compares
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.is_list() && b.is_list()) {
    const List &x = a.items(), &y = b.items();
    for (size_t i = 0; i < x.size() && i < y.size(); i++) {
      if (x[i].equals(y[i])) continue;
      return compare(x[i], y[i]);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  throw std::runtime_error(std::string("'<' not supported between instances of '") + a.type_name() + "' and '" +
                           b.type_name() + "'");
}

}  // namespace trellm::jinja
