// A small JSON reader and writer (RFC 8259), enough for manifest.json, scheduler configs and
// safetensors headers. Standard library only.
//
// Python's json module writes NaN, Infinity and -Infinity for non-finite floats; those tokens are
// accepted too, so every manifest that quest_export writes can be read. Numbers are held as double
// (integers up to 2^53 are exact). Objects keep their keys sorted (std::map); a repeated key keeps
// the last value, as Python does.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "quest/status.h"

namespace quest::json {

class Value {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  using Array = std::vector<Value>;
  using Object = std::map<std::string, Value>;

  Value() = default;
  static Value Bool(bool b);
  static Value Number(double d);
  static Value String(std::string s);
  static Value MakeArray(Array a);
  static Value MakeObject(Object o);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }
  // True for a number with an exact integer value that fits in int64.
  bool is_integer() const;

  bool as_bool() const { return bool_; }
  double as_number() const { return number_; }
  int64_t as_int() const { return static_cast<int64_t>(number_); }
  const std::string& as_string() const { return string_; }
  const Array& as_array() const { return array_; }
  const Object& as_object() const { return object_; }

  // Object member or nullptr (also nullptr when this is not an object).
  const Value* find(const std::string& key) const;

 private:
  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0.0;
  std::string string_;
  Array array_;
  Object object_;
};

// Parse a whole document. On failure the message gives line and column.
Status Parse(const std::string& text, Value* out);
// Read and parse a file; errors name the file.
Status ParseFile(const std::string& path, Value* out);

// Canonical text: sorted keys, no whitespace, numbers as the shortest %.17g that round-trips,
// integers without exponent, non-finite numbers as NaN / Infinity / -Infinity (Python's spelling).
std::string Dump(const Value& v);

const char* TypeName(Value::Type t);

}  // namespace quest::json
