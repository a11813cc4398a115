#include "quest/png.h"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace quest {

Status EncodePng(const Image& img, std::string* png) {
  if (img.width <= 0 || img.height <= 0) return InvalidInput("PNG image must have a positive size");
  if (img.channels != 1 && img.channels != 3) return InvalidInput("PNG writer supports 1 (grey) or 3 (RGB) channels");
  const size_t row = static_cast<size_t>(img.width) * img.channels;
  if (img.pixels.size() != row * img.height) return InternalError("PNG pixel buffer does not match its size");
  png_image pi;
  std::memset(&pi, 0, sizeof pi);
  pi.version = PNG_IMAGE_VERSION;
  pi.width = static_cast<png_uint_32>(img.width);
  pi.height = static_cast<png_uint_32>(img.height);
  pi.format = img.channels == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
  const png_int_32 stride = static_cast<png_int_32>(row);
  png_alloc_size_t size = 0;  // first call: the size the encoded file needs
  if (!png_image_write_to_memory(&pi, nullptr, &size, 0, img.pixels.data(), stride, nullptr)) {
    std::string why = pi.message;
    png_image_free(&pi);
    return InternalError("libpng could not encode the image: " + why);
  }
  std::string out(size, '\0');
  if (!png_image_write_to_memory(&pi, out.data(), &size, 0, img.pixels.data(), stride, nullptr)) {
    std::string why = pi.message;
    png_image_free(&pi);
    return InternalError("libpng could not encode the image: " + why);
  }
  png_image_free(&pi);
  out.resize(size);
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
