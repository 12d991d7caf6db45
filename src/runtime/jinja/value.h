// Values of the Jinja subset used by chat templates: Python-like (None, bool, int, float, str, list, dict with
// insertion order) plus Jinja's Undefined and callables (macros, builtins). Lists and dicts are shared by
// reference, as in Python, so `namespace()` attributes set inside loops are seen outside.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace trellm::jinja {

class Value;
using List = std::vector<Value>;
struct Dict;
struct CallArgs;
using Function = std::function<Value(CallArgs&)>;

class Value {
 public:
  enum class Kind { Undefined, None, Bool, Int, Float, String, List, Dict, Function };

  Value() = default;  // Undefined
  static Value none() { Value v; v.kind_ = Kind::None; return v; }
  Value(bool b) : kind_(Kind::Bool), i_(b) {}
  Value(int v) : kind_(Kind::Int), i_(v) {}
  Value(int64_t v) : kind_(Kind::Int), i_(v) {}
  Value(double v) : kind_(Kind::Float), f_(v) {}
  Value(std::string s) : kind_(Kind::String), s_(std::make_shared<std::string>(std::move(s))) {}
  Value(const char* s) : Value(std::string(s)) {}
  static Value list(List items = {});
  // A tuple is a list that prints as (a, b) — Python's repr — e.g. dict items and tuple literals.
  static Value tuple(List items);
  bool is_tuple() const { return tuple_; }
  static Value dict();
  static Value function(Function f, std::string name);
  static Value from_json(const nlohmann::ordered_json& j);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::Undefined; }
  bool is_none() const { return kind_ == Kind::None; }
  bool is_bool() const { return kind_ == Kind::Bool; }
  bool is_int() const { return kind_ == Kind::Int; }
  bool is_float() const { return kind_ == Kind::Float; }
  bool is_number() const { return kind_ == Kind::Int || kind_ == Kind::Float || kind_ == Kind::Bool; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_list() const { return kind_ == Kind::List; }
  bool is_dict() const { return kind_ == Kind::Dict; }
  bool is_function() const { return kind_ == Kind::Function; }

  bool as_bool() const { return i_ != 0; }
  // A float is truncated like Python's int(); one outside the 64-bit range (or NaN) is an error, not UB.
  int64_t as_int() const { return kind_ == Kind::Float ? float_to_int(f_) : i_; }
  static int64_t float_to_int(double f);  // throws std::runtime_error out of range
  double as_float() const { return kind_ == Kind::Float ? f_ : double(i_); }
  const std::string& str() const { return *s_; }
  List& items() const { return *l_; }
  Dict& dict_ref() const { return *d_; }
  const Function& fn() const { return *fn_; }
  const std::string& fn_name() const { return *s_; }

  // Python truthiness (Undefined is false).
  bool truthy() const;
  // Python str(): what {{ x }} prints. Undefined prints nothing.
  std::string to_str() const;
  // Python repr(), used for str() of containers: ['a', 1, None].
  std::string repr() const;
  // json.dumps(x, ensure_ascii=False, indent=indent, separators=..., sort_keys=...): transformers' tojson.
  std::string to_json(int indent, const std::string& item_sep, const std::string& key_sep, bool sort_keys) const;
  nlohmann::ordered_json to_json_value() const;
  const char* type_name() const;

  // Python ==, and the ordering of <, <= (false / throws for incomparable types, see compare()).
  bool equals(const Value& o) const;

 private:
  Kind kind_ = Kind::Undefined;
  bool tuple_ = false;
  int64_t i_ = 0;
  double f_ = 0;
  std::shared_ptr<std::string> s_;
  std::shared_ptr<List> l_;
  std::shared_ptr<Dict> d_;
  std::shared_ptr<Function> fn_;
};

// Insertion-ordered string-keyed map (Python dict; JSON objects keep their key order).
struct Dict {
  std::vector<std::pair<std::string, Value>> entries;
  bool is_namespace = false;
  const Value* find(const std::string& k) const;
  Value* find(const std::string& k);
  void set(const std::string& k, Value v);
};

struct CallArgs {
  std::vector<Value> args;
  std::vector<std::pair<std::string, Value>> kwargs;
  // Positional argument i, else keyword `name`, else `dflt`.
  Value get(size_t i, const std::string& name, Value dflt = Value()) const;
  bool has(size_t i, const std::string& name) const;
};

// -1, 0, 1 for Python ordering of numbers or strings; throws std::runtime_error for other combinations.
int compare(const Value& a, const Value& b);

// Python float repr (shortest round-trip: 1.0, 0.1, 1e-05, 1e+20).
std::string python_float_repr(double v);

}  // namespace trellm::jinja
