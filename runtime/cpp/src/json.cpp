#include "quest/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>

namespace quest::json {

Value Value::Bool(bool b) {
  Value v;
  v.type_ = Type::kBool;
  v.bool_ = b;
  return v;
}
Value Value::Number(double d) {
  Value v;
  v.type_ = Type::kNumber;
  v.number_ = d;
  return v;
}
Value Value::String(std::string s) {
  Value v;
  v.type_ = Type::kString;
  v.string_ = std::move(s);
  return v;
}
Value Value::MakeArray(Array a) {
  Value v;
  v.type_ = Type::kArray;
  v.array_ = std::move(a);
  return v;
}
Value Value::MakeObject(Object o) {
  Value v;
  v.type_ = Type::kObject;
  v.object_ = std::move(o);
  return v;
}

bool Value::is_integer() const {
  if (type_ != Type::kNumber || !std::isfinite(number_)) return false;
  if (std::floor(number_) != number_) return false;
  return number_ >= -9.2233720368547758e18 && number_ < 9.2233720368547758e18;
}

const Value* Value::find(const std::string& key) const {
  if (type_ != Type::kObject) return nullptr;
  auto it = object_.find(key);
  return it == object_.end() ? nullptr : &it->second;
}

const char* TypeName(Value::Type t) {
  switch (t) {
    case Value::Type::kNull: return "null";
    case Value::Type::kBool: return "bool";
    case Value::Type::kNumber: return "number";
    case Value::Type::kString: return "string";
    case Value::Type::kArray: return "array";
    case Value::Type::kObject: return "object";
  }
  return "?";
}

namespace {

constexpr int kMaxDepth = 512;  // nesting limit: a corrupt file must not overflow the stack

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Status ParseDocument(Value* out) {
    SkipWhitespace();
    QUEST_RETURN_IF_ERROR(ParseValue(out, 0));
    SkipWhitespace();
    if (pos_ != s_.size()) return Fail("unexpected text after the JSON value");
    return Status::Ok();
  }

 private:
  Status Fail(const std::string& what) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < pos_ && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    return InvalidInput("invalid JSON at line " + std::to_string(line) + ", column " + std::to_string(col) + ": " +
                        what);
  }

  void SkipWhitespace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  bool Consume(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(pos_, n, word) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  Status ParseValue(Value* out, int depth) {
    if (depth > kMaxDepth) return Fail("nesting deeper than " + std::to_string(kMaxDepth));
    if (pos_ >= s_.size()) return Fail("unexpected end of input");
    char c = s_[pos_];
    if (c == '{') return ParseObject(out, depth);
    if (c == '[') return ParseArray(out, depth);
    if (c == '"') {
      std::string str;
      QUEST_RETURN_IF_ERROR(ParseString(&str));
      *out = Value::String(std::move(str));
      return Status::Ok();
    }
    if (Consume("true")) {
      *out = Value::Bool(true);
      return Status::Ok();
    }
    if (Consume("false")) {
      *out = Value::Bool(false);
      return Status::Ok();
    }
    if (Consume("null")) {
      *out = Value();
      return Status::Ok();
    }
    // Python's json extensions for non-finite floats.
    if (Consume("NaN")) {
      *out = Value::Number(std::numeric_limits<double>::quiet_NaN());
      return Status::Ok();
    }
    if (Consume("Infinity")) {
      *out = Value::Number(std::numeric_limits<double>::infinity());
      return Status::Ok();
    }
    if (Consume("-Infinity")) {
      *out = Value::Number(-std::numeric_limits<double>::infinity());
      return Status::Ok();
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber(out);
    return Fail(std::string("unexpected character '") + c + "'");
  }

  Status ParseObject(Value* out, int depth) {
    ++pos_;  // '{'
    Value::Object obj;
    SkipWhitespace();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      ++pos_;
      *out = Value::MakeObject(std::move(obj));
      return Status::Ok();
    }
    while (true) {
      SkipWhitespace();
      if (pos_ >= s_.size() || s_[pos_] != '"') return Fail("expected a string key");
      std::string key;
      QUEST_RETURN_IF_ERROR(ParseString(&key));
      SkipWhitespace();
      if (pos_ >= s_.size() || s_[pos_] != ':') return Fail("expected ':' after an object key");
      ++pos_;
      SkipWhitespace();
      Value v;
      QUEST_RETURN_IF_ERROR(ParseValue(&v, depth + 1));
      obj[key] = std::move(v);
      SkipWhitespace();
      if (pos_ >= s_.size()) return Fail("unterminated object");
      if (s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (s_[pos_] == '}') {
        ++pos_;
        break;
      }
      return Fail("expected ',' or '}' in an object");
    }
    *out = Value::MakeObject(std::move(obj));
    return Status::Ok();
  }

  Status ParseArray(Value* out, int depth) {
    ++pos_;  // '['
    Value::Array arr;
    SkipWhitespace();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      ++pos_;
      *out = Value::MakeArray(std::move(arr));
      return Status::Ok();
    }
    while (true) {
      SkipWhitespace();
      Value v;
      QUEST_RETURN_IF_ERROR(ParseValue(&v, depth + 1));
      arr.push_back(std::move(v));
      SkipWhitespace();
      if (pos_ >= s_.size()) return Fail("unterminated array");
      if (s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (s_[pos_] == ']') {
        ++pos_;
        break;
      }
      return Fail("expected ',' or ']' in an array");
    }
    *out = Value::MakeArray(std::move(arr));
    return Status::Ok();
  }

  Status ParseHex4(uint32_t* out) {
    if (pos_ + 4 > s_.size()) return Fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
      else return Fail("bad hex digit in \\u escape");
    }
    *out = v;
    return Status::Ok();
  }

  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  Status ParseString(std::string* out) {
    ++pos_;  // opening quote
    out->clear();
    while (true) {
      if (pos_ >= s_.size()) return Fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return Status::Ok();
      }
      if (c < 0x20) return Fail("control character inside a string");
      if (c != '\\') {
        out->push_back(static_cast<char>(c));
        ++pos_;
        continue;
      }
      ++pos_;
      if (pos_ >= s_.size()) return Fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out->push_back('"'); break;
        case '\\': out->push_back('\\'); break;
        case '/': out->push_back('/'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t cp = 0;
          QUEST_RETURN_IF_ERROR(ParseHex4(&cp));
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // high surrogate: a low one must follow
            uint32_t lo = 0;
            if (!Consume("\\u")) return Fail("high surrogate without a low surrogate");
            QUEST_RETURN_IF_ERROR(ParseHex4(&lo));
            if (lo < 0xDC00 || lo > 0xDFFF) return Fail("invalid low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return Fail("lone low surrogate");
          }
          AppendUtf8(cp, out);
          break;
        }
        default: return Fail(std::string("invalid escape '\\") + e + "'");
      }
    }
  }

  Status ParseNumber(Value* out) {
    size_t start = pos_;
    auto digit = [&](size_t i) { return i < s_.size() && s_[i] >= '0' && s_[i] <= '9'; };
    if (s_[pos_] == '-') ++pos_;
    if (!digit(pos_)) return Fail("expected a digit");
    if (s_[pos_] == '0') {
      ++pos_;
      if (digit(pos_)) return Fail("leading zero in a number");
    } else {
      while (digit(pos_)) ++pos_;
    }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      if (!digit(pos_)) return Fail("expected a digit after '.'");
      while (digit(pos_)) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (!digit(pos_)) return Fail("expected a digit in the exponent");
      while (digit(pos_)) ++pos_;
    }
    std::string token = s_.substr(start, pos_ - start);
    char* end = nullptr;
    double d = std::strtod(token.c_str(), &end);  // the "C" locale: programs here never call setlocale
    if (end != token.c_str() + token.size()) return Fail("malformed number '" + token + "'");
    *out = Value::Number(d);
    return Status::Ok();
  }

  const std::string& s_;
  size_t pos_ = 0;
};

void DumpString(const std::string& s, std::string* out) {
  out->push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\n': *out += "\\n"; break;
      case '\r': *out += "\\r"; break;
      case '\t': *out += "\\t"; break;
      case '\b': *out += "\\b"; break;
      case '\f': *out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          *out += buf;
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

void DumpNumber(double d, std::string* out) {
  if (std::isnan(d)) {
    *out += "NaN";
    return;
  }
  if (std::isinf(d)) {
    *out += d > 0 ? "Infinity" : "-Infinity";
    return;
  }
  char buf[40];
  if (std::floor(d) == d && std::fabs(d) < 1e16) {
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(d));
    *out += buf;
    return;
  }
  for (int prec = 1; prec <= 17; ++prec) {  // shortest text that reads back as the same double
    std::snprintf(buf, sizeof buf, "%.*g", prec, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  *out += buf;
}

void DumpTo(const Value& v, std::string* out) {
  switch (v.type()) {
    case Value::Type::kNull: *out += "null"; break;
    case Value::Type::kBool: *out += v.as_bool() ? "true" : "false"; break;
    case Value::Type::kNumber: DumpNumber(v.as_number(), out); break;
    case Value::Type::kString: DumpString(v.as_string(), out); break;
    case Value::Type::kArray: {
      out->push_back('[');
      bool first = true;
      for (const Value& e : v.as_array()) {
        if (!first) out->push_back(',');
        first = false;
        DumpTo(e, out);
      }
      out->push_back(']');
      break;
    }
    case Value::Type::kObject: {
      out->push_back('{');
      bool first = true;
      for (const auto& kv : v.as_object()) {
        if (!first) out->push_back(',');
        first = false;
        DumpString(kv.first, out);
        out->push_back(':');
        DumpTo(kv.second, out);
      }
      out->push_back('}');
      break;
    }
  }
}

}  // namespace

Status Parse(const std::string& text, Value* out) {
  Parser p(text);
  return p.ParseDocument(out);
}

Status ParseFile(const std::string& path, Value* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return IoError("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return IoError("cannot read " + path);
  return Parse(ss.str(), out).WithContext(path);
}

std::string Dump(const Value& v) {
  std::string out;
  DumpTo(v, &out);
  return out;
}

}  // namespace quest::json
