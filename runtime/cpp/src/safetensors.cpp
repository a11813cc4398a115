// Own reader on purpose (see include/quest/safetensors.h): no safetensors library for C/C++ is packaged
// for Debian/Ubuntu or JetPack. The JSON header goes through nlohmann/json.
#include "quest/safetensors.h"

#include <cstring>

#include "quest/json.h"

namespace quest {
namespace {

float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h >> 15) << 31;
  uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

Status ReadSafetensors(const std::string& path, SafetensorsFile* out) {
  std::string bytes;
  QUEST_RETURN_IF_ERROR(ReadFileBytes(path, &bytes));
  if (bytes.size() < 8) return InvalidInput(path + ": too short for a safetensors file");
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  if (header_len > bytes.size() - 8) return InvalidInput(path + ": header length " + std::to_string(header_len) + " exceeds the file size");
  json::Value header;
  QUEST_RETURN_IF_ERROR(json::Parse(bytes.substr(8, header_len), &header).WithContext(path + " header"));
  if (!header.is_object()) return InvalidInput(path + ": header is not a JSON object");
  const size_t data_start = 8 + header_len;
  const size_t data_size = bytes.size() - data_start;
  SafetensorsFile result;
  for (const auto& kv : header.items()) {
    const std::string& name = kv.key();
    const json::Value& info = kv.value();
    if (name == "__metadata__") {
      if (!info.is_object()) return InvalidInput(path + ": __metadata__ is not an object");
      for (const auto& m : info.items()) {
        if (!m.value().is_string()) return InvalidInput(path + ": metadata value '" + m.key() + "' is not a string");
        result.metadata[m.key()] = json::AsString(m.value());
      }
      continue;
    }
    const json::Value* dtype = json::Find(info, "dtype");
    const json::Value* shape = json::Find(info, "shape");
    const json::Value* offsets = json::Find(info, "data_offsets");
    if (!dtype || !dtype->is_string() || !shape || !shape->is_array() || !offsets || !offsets->is_array() ||
        offsets->size() != 2) {
      return InvalidInput(path + ": tensor '" + name + "' lacks dtype, shape or data_offsets");
    }
    size_t itemsize = 0;
    const std::string& dt = json::AsString(*dtype);
    if (dt == "F32") itemsize = 4;
    else if (dt == "F64") itemsize = 8;
    else if (dt == "F16" || dt == "BF16") itemsize = 2;
    else return InvalidInput(path + ": tensor '" + name + "' has dtype " + dt + "; only F32, F64, F16 and BF16 are read");
    Tensor t;
    for (const json::Value& d : *shape) {
      if (!json::IsInteger(d) || json::AsInt(d) < 0) return InvalidInput(path + ": tensor '" + name + "' has a bad shape");
      t.shape.push_back(json::AsInt(d));
    }
    const json::Value& b = offsets->at(0);
    const json::Value& e = offsets->at(1);
    if (!json::IsInteger(b) || !json::IsInteger(e) || json::AsInt(b) < 0 || json::AsInt(e) < json::AsInt(b) ||
        static_cast<uint64_t>(json::AsInt(e)) > data_size) {
      return InvalidInput(path + ": tensor '" + name + "' has data_offsets outside the file");
    }
    size_t n = Numel(t.shape);
    if (static_cast<size_t>(json::AsInt(e) - json::AsInt(b)) != n * itemsize) {
      return InvalidInput(path + ": tensor '" + name + "' data size does not match shape " + ShapeString(t.shape));
    }
    const char* p = bytes.data() + data_start + json::AsInt(b);
    t.data.resize(n);
    for (size_t i = 0; i < n; ++i) {
      if (dt == "F32") {
        std::memcpy(&t.data[i], p + 4 * i, 4);
      } else if (dt == "F64") {
        double d;
        std::memcpy(&d, p + 8 * i, 8);
        t.data[i] = static_cast<float>(d);
      } else {
        uint16_t h = static_cast<uint16_t>(static_cast<unsigned char>(p[2 * i]) |
                                           (static_cast<unsigned char>(p[2 * i + 1]) << 8));
        if (dt == "F16") {
          t.data[i] = HalfToFloat(h);
        } else {
          uint32_t bits = static_cast<uint32_t>(h) << 16;
          std::memcpy(&t.data[i], &bits, 4);
        }
      }
    }
    result.dtypes[name] = dt;
    result.tensors[name] = std::move(t);
  }
  *out = std::move(result);
  return Status::Ok();
}

}  // namespace quest
