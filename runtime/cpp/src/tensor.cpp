// Own .npy reader/writer on purpose: no C/C++ NumPy-file library is packaged for Debian/Ubuntu or JetPack
// (apt-cache search cnpy / npy finds none); .npy is a short text header plus raw little-endian data.
#include "quest/tensor.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

namespace quest {

Tensor Tensor::Zeros(std::vector<int64_t> s) {
  size_t n = Numel(s);
  return Tensor(std::move(s), std::vector<float>(n, 0.0f));
}

size_t Numel(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d < 0 ? 0 : d);
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Status ReadFileBytes(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return IoError("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return IoError("cannot read " + path);
  *out = ss.str();
  return Status::Ok();
}

Status WriteFileAtomic(const std::string& path, const std::string& bytes) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return IoError("cannot write " + tmp);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!f) return IoError("write error on " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return IoError("cannot rename " + tmp + " to " + path);
  return Status::Ok();
}

namespace {

bool LittleEndianHost() {
  const uint16_t one = 1;
  uint8_t b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

// Value of 'key': in the .npy header dict, e.g. "'descr': '<f4'" -> "'<f4'".
std::string HeaderField(const std::string& header, const std::string& key) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) return "";
  size_t colon = header.find(':', k);
  if (colon == std::string::npos) return "";
  size_t start = colon + 1;
  while (start < header.size() && header[start] == ' ') ++start;
  size_t end = start;
  if (start < header.size() && header[start] == '(') {
    end = header.find(')', start);
    return end == std::string::npos ? "" : header.substr(start, end - start + 1);
  }
  while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  return header.substr(start, end - start);
}

std::string NpyHeader(const std::string& descr, const std::vector<int64_t>& shape) {
  std::string shp = "(";
  for (size_t i = 0; i < shape.size(); ++i) shp += std::to_string(shape[i]) + (shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
  shp += ")";
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shp + ", }";
  size_t total = 10 + dict.size() + 1;  // magic(6) + version(2) + len(2) + dict + '\n'
  size_t padded = (total + 63) / 64 * 64;
  dict.append(padded - total, ' ');
  dict.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(dict.size() & 0xFF));
  out.push_back(static_cast<char>((dict.size() >> 8) & 0xFF));
  return out + dict;
}

}  // namespace

Status ReadNpy(const std::string& path, Tensor* out) {
  if (!LittleEndianHost()) return InternalError("the .npy reader supports little-endian hosts only");
  std::string bytes;
  QUEST_RETURN_IF_ERROR(ReadFileBytes(path, &bytes));
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) return InvalidInput(path + ": not a .npy file");
  int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, offset = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) return InvalidInput(path + ": truncated .npy header");
    for (int i = 0; i < 4; ++i) header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    offset = 12;
  } else {
    return InvalidInput(path + ": unsupported .npy version " + std::to_string(major));
  }
  if (offset + header_len > bytes.size()) return InvalidInput(path + ": truncated .npy header");
  std::string header = bytes.substr(offset, header_len);
  std::string descr = HeaderField(header, "descr");
  std::string fortran = HeaderField(header, "fortran_order");
  std::string shape_text = HeaderField(header, "shape");
  if (fortran.find("False") == std::string::npos) return InvalidInput(path + ": Fortran-order arrays are not supported; save with np.ascontiguousarray");
  size_t itemsize = 0;
  if (descr == "'<f4'") itemsize = 4;
  else if (descr == "'<f8'") itemsize = 8;
  else return InvalidInput(path + ": dtype " + descr + " not supported (need float32 '<f4' or float64 '<f8')");
  std::vector<int64_t> shape;
  if (shape_text.size() < 2 || shape_text.front() != '(') return InvalidInput(path + ": bad shape in .npy header");
  std::string inner = shape_text.substr(1, shape_text.size() - 2);
  std::stringstream ss(inner);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t a = item.find_first_not_of(' ');
    if (a == std::string::npos) continue;
    char* end = nullptr;
    long long d = std::strtoll(item.c_str() + a, &end, 10);
    if (end == item.c_str() + a || d < 0) return InvalidInput(path + ": bad shape " + shape_text + " in .npy header");
    shape.push_back(d);
  }
  size_t n = Numel(shape);
  size_t data_off = offset + header_len;
  if (bytes.size() - data_off != n * itemsize) {
    return InvalidInput(path + ": data size does not match shape " + ShapeString(shape));
  }
  out->shape = shape;
  out->data.resize(n);
  if (itemsize == 4) {
    std::memcpy(out->data.data(), bytes.data() + data_off, n * 4);
  } else {
    for (size_t i = 0; i < n; ++i) {
      double d;
      std::memcpy(&d, bytes.data() + data_off + 8 * i, 8);
      out->data[i] = static_cast<float>(d);
    }
  }
  return Status::Ok();
}

Status WriteNpy(const std::string& path, const Tensor& t) {
  if (!LittleEndianHost()) return InternalError("the .npy writer supports little-endian hosts only");
  if (Numel(t.shape) != t.data.size()) return InternalError("tensor data does not match its shape " + ShapeString(t.shape));
  std::string out = NpyHeader("<f4", t.shape);
  out.append(reinterpret_cast<const char*>(t.data.data()), t.data.size() * sizeof(float));
  return WriteFileAtomic(path, out);
}

Status WriteNpyInt64(const std::string& path, const std::vector<int64_t>& values) {
  if (!LittleEndianHost()) return InternalError("the .npy writer supports little-endian hosts only");
  std::string out = NpyHeader("<i8", {static_cast<int64_t>(values.size())});
  out.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(int64_t));
  return WriteFileAtomic(path, out);
}

}  // namespace quest
