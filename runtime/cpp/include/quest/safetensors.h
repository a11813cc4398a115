// Reader kept in this runtime on purpose: no C or C++ safetensors library is packaged for Debian/Ubuntu or
// JetPack (apt-cache search safetensors finds none), and the format is an 8-byte length, a JSON header
// (parsed with nlohmann/json) and raw data, so the reader is short.
//
// Reader for the safetensors format (conditioning.safetensors): an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then
// the raw little-endian data. F32, F64, F16 and BF16 tensors are read as float32.
#pragma once

#include <map>
#include <string>

#include "quest/status.h"
#include "quest/tensor.h"

namespace quest {

struct SafetensorsFile {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;  // "__metadata__"
  std::map<std::string, std::string> dtypes;    // name -> dtype as stored ("F32", ...)
};

Status ReadSafetensors(const std::string& path, SafetensorsFile* out);

}  // namespace quest
