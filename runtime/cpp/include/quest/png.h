// PNG output through libpng's simplified write API (png_image_write_to_memory, libpng >= 1.6.29:
// Debian/Ubuntu libpng-dev, part of every JetPack image): 8-bit grey or RGB. Also the image grid of quest_export.runtime.images (same layout and rounding), so both runtimes
// write the same pixels for the same samples.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "quest/status.h"
#include "quest/tensor.h"

namespace quest {

struct Image {
  int width = 0;
  int height = 0;
  int channels = 0;            // 1 (grey) or 3 (RGB)
  std::vector<uint8_t> pixels;  // row-major, interleaved channels
};

// The PNG file as bytes.
Status EncodePng(const Image& img, std::string* png);
Status WritePng(const std::string& path, const Image& img);

// Samples x (N, C, H, W) in [-1, 1] -> uint8 grid, as quest_export.runtime.images.make_grid:
// u8 = rint(clip((x + 1) * 127.5, 0, 255)) in float32; images per row = nrow (0 = ceil(sqrt(N)));
// `pad` black pixels around every tile. C must be 1 or 3.
Status MakeGrid(const Tensor& x, int nrow, int pad, Image* out);

}  // namespace quest
