// The inference backends behind one interface, with the runner lifecycle of style.md rule 9:
// construct cheaply, Activate() (load the session / deserialize the engine), Infer(feeds) any number
// of times, Deactivate(). Feeds and outputs are float32 host tensors keyed by graph tensor name.
//
// Which backends exist is decided when CMake configures the build: a backend whose library was not
// found is not compiled, and CreateBackend() refuses it with the reason CMake recorded.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "quest/status.h"
#include "quest/tensor.h"

namespace quest {

struct BackendOptions {
  std::string model_path;  // .onnx (ort) or .plan (trt)
  int intra_op_threads = 0;  // ort: 0 = ONNX Runtime's default
  int device = 0;            // trt: CUDA device ordinal
  // trt: named when the plan does not fit (the engine folder was checked against this device before, device.h)
  std::string rebuild_command;
};

class Backend {
 public:
  virtual ~Backend() = default;
  Backend() = default;
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  virtual std::string name() const = 0;
  virtual Status Activate() = 0;
  // Every graph input must be fed; every graph output is returned.
  virtual Status Infer(const TensorMap& feeds, TensorMap* outputs) = 0;
  virtual void Deactivate() = 0;
  // Graph input / output names (valid after Activate).
  virtual std::vector<std::string> InputNames() const = 0;
  virtual std::vector<std::string> OutputNames() const = 0;
};

// kind: "ort" or "trt".
Status CreateBackend(const std::string& kind, const BackendOptions& options, std::unique_ptr<Backend>* out);

// Whether `kind` was compiled in; otherwise *why_not says what CMake looked for and where.
bool BackendBuilt(const std::string& kind, std::string* why_not);

// One line per backend: "ort: built (...)" or "trt: not built: ...".
std::string DescribeBackends();

}  // namespace quest
