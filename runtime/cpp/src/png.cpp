#include "quest/png.h"

#include <algorithm>
#include <cmath>

namespace quest {
namespace {

constexpr size_t kMaxStoredBlock = 65535;  // deflate stored blocks hold at most 2^16 - 1 bytes

void PutBe32(std::string* out, uint32_t v) {
  out->push_back(static_cast<char>(v >> 24));
  out->push_back(static_cast<char>(v >> 16));
  out->push_back(static_cast<char>(v >> 8));
  out->push_back(static_cast<char>(v));
}

void PutChunk(std::string* out, const char tag[4], const std::string& data) {
  PutBe32(out, static_cast<uint32_t>(data.size()));
  std::string tagged(tag, 4);
  tagged += data;
  out->append(tagged);
  PutBe32(out, Crc32(reinterpret_cast<const uint8_t*>(tagged.data()), tagged.size()));
}

// zlib stream (RFC 1950) of stored deflate blocks (RFC 1951, BTYPE = 00).
std::string ZlibStored(const std::string& raw) {
  std::string z;
  z.push_back(static_cast<char>(0x78));  // CMF: deflate, 32K window
  z.push_back(static_cast<char>(0x01));  // FLG: no dictionary, fastest; (0x78 << 8 | 0x01) % 31 == 0
  size_t pos = 0;
  do {
    size_t len = std::min(kMaxStoredBlock, raw.size() - pos);
    bool final = pos + len == raw.size();
    z.push_back(static_cast<char>(final ? 1 : 0));  // BFINAL, BTYPE = 00, byte-aligned
    z.push_back(static_cast<char>(len & 0xFF));
    z.push_back(static_cast<char>(len >> 8));
    z.push_back(static_cast<char>(~len & 0xFF));
    z.push_back(static_cast<char>((~len >> 8) & 0xFF));
    z.append(raw, pos, len);
    pos += len;
  } while (pos < raw.size());
  PutBe32(&z, Adler32(reinterpret_cast<const uint8_t*>(raw.data()), raw.size()));
  return z;
}

}  // namespace

uint32_t Crc32(const uint8_t* data, size_t n, uint32_t crc) {
  static uint32_t table[256];
  static bool ready = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    return true;
  }();
  (void)ready;
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t Adler32(const uint8_t* data, size_t n) {
  constexpr uint32_t kMod = 65521;
  uint32_t a = 1, b = 0;
  for (size_t i = 0; i < n; ++i) {
    a = (a + data[i]) % kMod;
    b = (b + a) % kMod;
  }
  return (b << 16) | a;
}

Status EncodePng(const Image& img, std::string* png) {
  if (img.width <= 0 || img.height <= 0) return InvalidInput("PNG image must have a positive size");
  if (img.channels != 1 && img.channels != 3) return InvalidInput("PNG writer supports 1 (grey) or 3 (RGB) channels");
  const size_t row = static_cast<size_t>(img.width) * img.channels;
  if (img.pixels.size() != row * img.height) return InternalError("PNG pixel buffer does not match its size");
  std::string raw;
  raw.reserve((row + 1) * img.height);
  for (int y = 0; y < img.height; ++y) {
    raw.push_back('\0');  // filter type 0 (None)
    raw.append(reinterpret_cast<const char*>(img.pixels.data() + y * row), row);
  }
  std::string ihdr;
  PutBe32(&ihdr, static_cast<uint32_t>(img.width));
  PutBe32(&ihdr, static_cast<uint32_t>(img.height));
  ihdr.push_back(8);                                    // bit depth
  ihdr.push_back(static_cast<char>(img.channels == 1 ? 0 : 2));  // colour type: grey or RGB
  ihdr.push_back(0);                                    // compression: deflate
  ihdr.push_back(0);                                    // filter method 0
  ihdr.push_back(0);                                    // no interlace
  std::string out("\x89PNG\r\n\x1a\n", 8);
  PutChunk(&out, "IHDR", ihdr);
  PutChunk(&out, "IDAT", ZlibStored(raw));
  PutChunk(&out, "IEND", "");
  *png = std::move(out);
  return Status::Ok();
}

Status WritePng(const std::string& path, const Image& img) {
  std::string png;
  QUEST_RETURN_IF_ERROR(EncodePng(img, &png));
  return WriteFileAtomic(path, png);
}

Status MakeGrid(const Tensor& x, int nrow, int pad, Image* out) {
  if (x.shape.size() != 4) return InvalidInput("image grid needs samples of shape (N, C, H, W), got " + ShapeString(x.shape));
  const int64_t n = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3];
  if (c != 1 && c != 3) return InvalidInput("image grid needs 1 or 3 channels, got " + std::to_string(c));
  if (n <= 0 || h <= 0 || w <= 0) return InvalidInput("image grid needs at least one non-empty image");
  if (nrow <= 0) nrow = std::max(1, static_cast<int>(std::ceil(std::sqrt(static_cast<double>(n)))));
  const int64_t ncol = (n + nrow - 1) / nrow;  // number of tile rows
  Image img;
  img.channels = static_cast<int>(c);
  img.height = static_cast<int>(ncol * (h + pad) + pad);
  img.width = static_cast<int>(nrow * (w + pad) + pad);
  img.pixels.assign(static_cast<size_t>(img.width) * img.height * c, 0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t r = k / nrow, q = k % nrow;
    const int64_t y0 = pad + r * (h + pad), x0 = pad + q * (w + pad);
    for (int64_t ch = 0; ch < c; ++ch) {
      for (int64_t yy = 0; yy < h; ++yy) {
        for (int64_t xx = 0; xx < w; ++xx) {
          float v = x.data[((k * c + ch) * h + yy) * w + xx];
          float s = (v + 1.0f) * 127.5f;  // float32, like numpy on a float32 array
          if (std::isnan(s)) s = 0.0f;      // a NaN sample becomes black instead of an undefined cast
          s = std::min(std::max(s, 0.0f), 255.0f);
          float r8 = std::nearbyint(s);  // round half to even (default rounding mode), like np.rint
          img.pixels[((y0 + yy) * img.width + (x0 + xx)) * c + ch] = static_cast<uint8_t>(r8);
        }
      }
    }
  }
  *out = std::move(img);
  return Status::Ok();
}

}  // namespace quest
