// JSON for the quest runtime: nlohmann/json (https://github.com/nlohmann/json, Debian/Ubuntu package
// nlohmann-json3-dev, header-only, so nothing extra goes to the device). This header adds the few
// helpers the runtime needs on top of it and keeps exceptions inside: every parse error becomes a Status.
//
// Documents are strict RFC 8259: quest_export writes manifests with allow_nan=False, so NaN / Infinity
// never appear in what this runtime reads; such a token is refused as invalid JSON.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "quest/status.h"

namespace quest::json {

using Value = nlohmann::json;

// Object member or nullptr (also nullptr when v is not an object).
const Value* Find(const Value& v, const std::string& key);
// True for a number with an exact integer value that fits in int64 (1 and 1.0 alike).
bool IsInteger(const Value& v);
// The value of a number for which IsInteger holds.
int64_t AsInt(const Value& v);
// The text of a string value (v must be a string).
const std::string& AsString(const Value& v);

// Parse a whole document; the message gives line and column ("invalid JSON at line L, column C: ...").
Status Parse(const std::string& text, Value* out);
// Read and parse a file; errors name the file.
Status ParseFile(const std::string& path, Value* out);

// Compact text with sorted keys (nlohmann's object order), numbers in their shortest round-trip form.
std::string Dump(const Value& v);

}  // namespace quest::json
