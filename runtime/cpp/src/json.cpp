#include "quest/json.h"

#include <cmath>
#include <limits>

#include "quest/tensor.h"

namespace quest::json {

const Value* Find(const Value& v, const std::string& key) {
  if (!v.is_object()) return nullptr;
  auto it = v.find(key);
  return it == v.end() ? nullptr : &*it;
}

bool IsInteger(const Value& v) {
  if (v.is_number_integer()) return true;  // signed or unsigned; unsigned above int64 is caught below
  if (!v.is_number_float()) return false;
  const double d = v.get<double>();
  return std::isfinite(d) && std::floor(d) == d && d >= -9.2233720368547758e18 && d < 9.2233720368547758e18;
}

int64_t AsInt(const Value& v) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    return u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max()
                                                                          : static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  return static_cast<int64_t>(v.get<double>());
}

const std::string& AsString(const Value& v) { return v.get_ref<const std::string&>(); }

Status Parse(const std::string& text, Value* out) {
  try {
    *out = Value::parse(text);
  } catch (const Value::parse_error& e) {
    // e.what(): "[json.exception.parse_error.101] parse error at line 1, column 9: syntax error ..."
    std::string what = e.what();
    const std::string marker = "parse error ";
    const size_t at = what.find(marker);
    return InvalidInput("invalid JSON " + (at == std::string::npos ? what : what.substr(at + marker.size())));
  }
  return Status::Ok();
}

Status ParseFile(const std::string& path, Value* out) {
  std::string text;
  QUEST_RETURN_IF_ERROR(ReadFileBytes(path, &text));
  return Parse(text, out).WithContext(path);
}

std::string Dump(const Value& v) {
  // replace invalid UTF-8 instead of throwing (strings come from a parsed, hence valid, document anyway)
  return v.dump(-1, ' ', false, Value::error_handler_t::replace);
}

}  // namespace quest::json
