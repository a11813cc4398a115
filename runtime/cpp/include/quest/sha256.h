// SHA-256 (FIPS 180-4), written for manifest file checks. Standard library only.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "quest/status.h"

namespace quest {

class Sha256 {
 public:
  Sha256();
  void Update(const void* data, size_t size);
  // Finish and return the 32-byte digest; the object must not be updated afterwards.
  std::array<uint8_t, 32> Finish();
  // Finish and return the lowercase hex digest (64 characters), like hashlib's hexdigest().
  std::string FinishHex();

 private:
  void Block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;  // bytes
};

std::string Sha256Hex(const std::string& data);
// Streams the file in 1 MiB chunks.
Status Sha256File(const std::string& path, std::string* hex);

}  // namespace quest
