// TensorRT backend: deserializes a plan built on this device and runs it with the name-based
// I/O API of TensorRT >= 8.5 (setInputShape / setTensorAddress / enqueueV3).
//
// Before the plan is deserialized it checks that the TensorRT library this process loaded has the major
// version of the headers it was built with. The engine folder's trt_version and compute_capability were
// checked before (CheckEngineDevice in device.cpp, the rules the Python runtime applies), with the facts
// TrtDeviceFacts below reports. A mismatch is refused with one line that names the rebuild command.
// Each TensorRT object lives in its own std::unique_ptr (TensorRT >= 8 objects are deleted with delete), as in sampleOnnxMNIST.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <memory>
#include <type_traits>

#include "quest/backend.h"

namespace quest {
namespace {

struct TrtVersion {
  int major = 0, minor = 0, patch = 0;
  std::string str() const { return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch); }
};

// getInferLibVersion() / NV_TENSORRT_VERSION: major*1000 + minor*100 + patch up to TensorRT 8,
// major*10000 + minor*100 + patch from TensorRT 10 on.
TrtVersion DecodeTrtVersion(int32_t v) {
  TrtVersion out;
  if (v >= 10000) {
    out.major = v / 10000;
    out.minor = (v / 100) % 100;
  } else {
    out.major = v / 1000;
    out.minor = (v / 100) % 10;
  }
  out.patch = v % 100;
  return out;
}

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
    if (severity <= Severity::kERROR) last_error_ = msg;
  }
  std::string last_error() const { return last_error_.empty() ? "no TensorRT error message" : last_error_; }

 private:
  std::string last_error_;
};

Status CudaCheck(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return BackendError(std::string(what) + " failed: " + cudaGetErrorString(err));
}

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  Status Reserve(size_t bytes) {
    if (bytes <= capacity_) return Status::Ok();
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    capacity_ = 0;
    QUEST_RETURN_IF_ERROR(CudaCheck(cudaMalloc(&ptr_, bytes), "cudaMalloc"));
    capacity_ = bytes;
    return Status::Ok();
  }
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  size_t capacity_ = 0;
};

struct StreamDeleter {
  void operator()(CUstream_st* s) const { cudaStreamDestroy(s); }
};

class TrtBackend : public Backend {
 public:
  explicit TrtBackend(BackendOptions options) : options_(std::move(options)) {}
  ~TrtBackend() override { Deactivate(); }

  std::string name() const override { return "trt(" + options_.model_path + ")"; }

  Status Activate() override {
    if (context_) return Status::Ok();
    const std::string rebuild = "; rebuild the engine on this device: " + options_.rebuild_command;
    // 1. library vs headers
    const TrtVersion lib = DecodeTrtVersion(getInferLibVersion());
    if (lib.major != NV_TENSORRT_MAJOR) {
      return ManifestMismatch("the loaded libnvinfer is TensorRT " + lib.str() + " but this runtime was compiled against TensorRT " +
                              std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) +
                              " headers; rebuild runtime/cpp against the installed TensorRT");
    }
    // 2. the CUDA device (the engine folder's compute capability was checked against it before: device.cpp)
    int count = 0;
    QUEST_RETURN_IF_ERROR(CudaCheck(cudaGetDeviceCount(&count), "cudaGetDeviceCount"));
    if (options_.device < 0 || options_.device >= count) {
      return InvalidInput("CUDA device " + std::to_string(options_.device) + " does not exist (" + std::to_string(count) + " found)");
    }
    QUEST_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(options_.device), "cudaSetDevice"));
    // 3. deserialize
    std::string plan;
    QUEST_RETURN_IF_ERROR(ReadFileBytes(options_.model_path, &plan));
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) return BackendError("createInferRuntime failed: " + logger_.last_error());
    engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine_) return BackendError(options_.model_path + ": TensorRT could not deserialize the plan (" + logger_.last_error() + ")" + rebuild);
    context_.reset(engine_->createExecutionContext());
    if (!context_) return BackendError(options_.model_path + ": createExecutionContext failed (" + logger_.last_error() + ")");
    cudaStream_t s = nullptr;
    QUEST_RETURN_IF_ERROR(CudaCheck(cudaStreamCreate(&s), "cudaStreamCreate"));
    stream_.reset(s);
    input_names_.clear();
    output_names_.clear();
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* n = engine_->getIOTensorName(i);
      if (engine_->getTensorDataType(n) != nvinfer1::DataType::kFLOAT) {
        Deactivate();
        return InvalidInput(options_.model_path + ": tensor '" + std::string(n) +
                            "' is not float32; build the engine with float32 I/O (docs/formats.md)");
      }
      if (engine_->getTensorIOMode(n) == nvinfer1::TensorIOMode::kINPUT) input_names_.emplace_back(n);
      else output_names_.emplace_back(n);
    }
    return Status::Ok();
  }

  Status Infer(const TensorMap& feeds, TensorMap* outputs) override {
    if (!context_) return InternalError("TrtBackend::Infer called before Activate");
    for (const auto& kv : feeds) {
      bool known = false;
      for (const auto& n : input_names_) known = known || n == kv.first;
      if (!known) return InvalidInput(options_.model_path + ": feed '" + kv.first + "' is not an engine input");
    }
    for (const auto& n : input_names_) {
      auto it = feeds.find(n);
      if (it == feeds.end()) return InvalidInput(options_.model_path + ": engine input '" + n + "' was not fed");
      const Tensor& t = it->second;
      nvinfer1::Dims dims{};
      using DimT = std::remove_reference_t<decltype(dims.d[0])>;
      if (t.shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS)) return InvalidInput("feed '" + n + "' has too many dimensions");
      dims.nbDims = static_cast<int32_t>(t.shape.size());
      for (size_t k = 0; k < t.shape.size(); ++k) dims.d[k] = static_cast<DimT>(t.shape[k]);
      if (!context_->setInputShape(n.c_str(), dims)) {
        return InvalidInput(options_.model_path + ": input '" + n + "' of shape " + ShapeString(t.shape) +
                            " is outside the engine's optimization profile (" + logger_.last_error() +
                            "); lower --batch or rebuild with larger profiles: " + options_.rebuild_command);
      }
      const size_t bytes = t.data.size() * sizeof(float);
      QUEST_RETURN_IF_ERROR(buffers_[n].Reserve(bytes > 0 ? bytes : 1));
      QUEST_RETURN_IF_ERROR(CudaCheck(cudaMemcpyAsync(buffers_[n].get(), t.data.data(), bytes, cudaMemcpyHostToDevice, stream_.get()), "cudaMemcpyAsync (input)"));
      if (!context_->setTensorAddress(n.c_str(), buffers_[n].get())) return BackendError("setTensorAddress('" + n + "') failed: " + logger_.last_error());
    }
    if (!context_->allInputDimensionsSpecified()) return BackendError(options_.model_path + ": not every input shape is specified");
    outputs->clear();
    for (const auto& n : output_names_) {
      nvinfer1::Dims dims = context_->getTensorShape(n.c_str());
      Tensor out;
      for (int32_t k = 0; k < dims.nbDims; ++k) {
        if (dims.d[k] < 0) return BackendError(options_.model_path + ": output '" + n + "' has an unresolved dimension");
        out.shape.push_back(static_cast<int64_t>(dims.d[k]));
      }
      out.data.resize(Numel(out.shape));
      const size_t bytes = out.data.size() * sizeof(float);
      QUEST_RETURN_IF_ERROR(buffers_[n].Reserve(bytes > 0 ? bytes : 1));
      if (!context_->setTensorAddress(n.c_str(), buffers_[n].get())) return BackendError("setTensorAddress('" + n + "') failed: " + logger_.last_error());
      (*outputs)[n] = std::move(out);
    }
    if (!context_->enqueueV3(stream_.get())) return BackendError(options_.model_path + ": enqueueV3 failed: " + logger_.last_error());
    for (const auto& n : output_names_) {
      Tensor& out = (*outputs)[n];
      QUEST_RETURN_IF_ERROR(CudaCheck(cudaMemcpyAsync(out.data.data(), buffers_[n].get(), out.data.size() * sizeof(float),
                                                      cudaMemcpyDeviceToHost, stream_.get()), "cudaMemcpyAsync (output)"));
    }
    return CudaCheck(cudaStreamSynchronize(stream_.get()), "cudaStreamSynchronize");
  }

  void Deactivate() override {
    if (stream_) cudaStreamSynchronize(stream_.get());
    context_.reset();  // context before engine before runtime
    engine_.reset();
    runtime_.reset();
    buffers_.clear();
    stream_.reset();
  }

  std::vector<std::string> InputNames() const override { return input_names_; }
  std::vector<std::string> OutputNames() const override { return output_names_; }

 private:
  BackendOptions options_;
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  std::unique_ptr<CUstream_st, StreamDeleter> stream_;
  std::map<std::string, DeviceBuffer> buffers_;
  std::vector<std::string> input_names_, output_names_;
};

}  // namespace

Status CreateTrtBackend(const BackendOptions& options, std::unique_ptr<Backend>* out) {
  *out = std::make_unique<TrtBackend>(options);
  return Status::Ok();
}

// What device.cpp's CheckEngineDevice compares an engine folder with: the loaded library's version and the
// compute capability of CUDA device `cuda_device`.
Status TrtDeviceFacts(int cuda_device, std::string* trt_version, std::string* compute_capability) {
  *trt_version = DecodeTrtVersion(getInferLibVersion()).str();
  int count = 0;
  QUEST_RETURN_IF_ERROR(CudaCheck(cudaGetDeviceCount(&count), "cudaGetDeviceCount"));
  if (cuda_device < 0 || cuda_device >= count) {
    return InvalidInput("CUDA device " + std::to_string(cuda_device) + " does not exist (" + std::to_string(count) + " found)");
  }
  int cc_major = 0, cc_minor = 0;
  QUEST_RETURN_IF_ERROR(CudaCheck(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, cuda_device), "cudaDeviceGetAttribute"));
  QUEST_RETURN_IF_ERROR(CudaCheck(cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, cuda_device), "cudaDeviceGetAttribute"));
  *compute_capability = std::to_string(cc_major) + "." + std::to_string(cc_minor);
  return Status::Ok();
}

std::string TrtBackendVersion() {
  return "libnvinfer " + DecodeTrtVersion(getInferLibVersion()).str() + ", headers " + std::to_string(NV_TENSORRT_MAJOR) +
         "." + std::to_string(NV_TENSORRT_MINOR) + "." + std::to_string(NV_TENSORRT_PATCH);
}

}  // namespace quest
