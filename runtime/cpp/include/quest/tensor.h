// Float32 host tensors (row-major), the feeds and outputs of every backend, and .npy files.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "quest/status.h"

namespace quest {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;  // row-major, size == Numel(shape)

  Tensor() = default;
  Tensor(std::vector<int64_t> s, std::vector<float> d) : shape(std::move(s)), data(std::move(d)) {}
  static Tensor Zeros(std::vector<int64_t> s);
  size_t numel() const { return data.size(); }
};

using TensorMap = std::map<std::string, Tensor>;  // name -> tensor

size_t Numel(const std::vector<int64_t>& shape);
std::string ShapeString(const std::vector<int64_t>& shape);  // "[2, 1, 32, 32]"

// NumPy .npy (format 1.0-3.0), C order, dtype <f4 or <f8 (read as float32) on read; <f4 on write.
Status ReadNpy(const std::string& path, Tensor* out);
Status WriteNpy(const std::string& path, const Tensor& t);
// Write a 1-D int64 array (<i8), e.g. the timesteps of a schedule.
Status WriteNpyInt64(const std::string& path, const std::vector<int64_t>& values);

// Read a whole file into memory.
Status ReadFileBytes(const std::string& path, std::string* out);
// Write a file through a temporary sibling that is renamed into place.
Status WriteFileAtomic(const std::string& path, const std::string& bytes);

}  // namespace quest
