#include "quest/sha256.h"

#include <openssl/evp.h>

#include <cstdio>
#include <memory>
#include <vector>

namespace quest {
namespace {

struct CtxFree {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};
using Ctx = std::unique_ptr<EVP_MD_CTX, CtxFree>;

Status Begin(Ctx* ctx) {
  ctx->reset(EVP_MD_CTX_new());
  if (!*ctx || EVP_DigestInit_ex(ctx->get(), EVP_sha256(), nullptr) != 1) {
    return InternalError("OpenSSL could not start a SHA-256 digest (EVP_DigestInit_ex)");
  }
  return Status::Ok();
}

Status FinishHex(EVP_MD_CTX* ctx, std::string* hex) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_DigestFinal_ex(ctx, md, &n) != 1) return InternalError("OpenSSL SHA-256 failed (EVP_DigestFinal_ex)");
  static const char* const kHex = "0123456789abcdef";
  hex->clear();
  for (unsigned int i = 0; i < n; ++i) {
    hex->push_back(kHex[md[i] >> 4]);
    hex->push_back(kHex[md[i] & 0xF]);
  }
  return Status::Ok();
}

}  // namespace

Status Sha256Hex(const std::string& data, std::string* hex) {
  Ctx ctx;
  QUEST_RETURN_IF_ERROR(Begin(&ctx));
  if (EVP_DigestUpdate(ctx.get(), data.data(), data.size()) != 1) return InternalError("OpenSSL SHA-256 update failed");
  return FinishHex(ctx.get(), hex);
}

Status Sha256File(const std::string& path, std::string* hex) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) return IoError("cannot open " + path);
  Ctx ctx;
  QUEST_RETURN_IF_ERROR(Begin(&ctx));
  std::vector<unsigned char> buf(1 << 20);
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), f.get())) > 0) {
    if (EVP_DigestUpdate(ctx.get(), buf.data(), n) != 1) return InternalError("OpenSSL SHA-256 update failed");
  }
  if (std::ferror(f.get())) return IoError("cannot read " + path);
  return FinishHex(ctx.get(), hex);
}

}  // namespace quest
