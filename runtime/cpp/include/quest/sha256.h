// SHA-256 of files and strings through OpenSSL's EVP digest API (libcrypto: Debian/Ubuntu libssl-dev,
// present on every JetPack image), for the manifest's file checks.
#pragma once

#include <string>

#include "quest/status.h"

namespace quest {

// Lowercase hex digest (64 characters), like hashlib's hexdigest().
Status Sha256Hex(const std::string& data, std::string* hex);
// Streams the file in 1 MiB chunks.
Status Sha256File(const std::string& path, std::string* hex);

}  // namespace quest
