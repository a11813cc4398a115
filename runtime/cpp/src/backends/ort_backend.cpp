// ONNX Runtime backend (CPU execution provider) through the ONNX Runtime C++ API.
//
// The C API is versioned: this file is compiled against headers of API version ORT_API_VERSION and
// runs on any libonnxruntime of that version or newer; an older library is refused at Activate().
// Session settings follow deploy.md §4: ORT_ENABLE_EXTENDED with QDQPropagationTransformer disabled
// (O-4, ORT's QDQ propagation bug on Q/DQ UNets) and QDQS8ToU8Transformer disabled (O-8: U8S8 saturates on x86
// without VNNI; session.py says what was measured), MatMulNBits accuracy level 0 (O-2, O-5).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_session_options_config_keys.h>

#include <memory>
#include <mutex>

#include "quest/backend.h"

namespace quest {
namespace {

Status InitOrtApi() {
  static std::once_flag once;
  static const OrtApi* api = nullptr;
  std::call_once(once, [] { api = OrtGetApiBase()->GetApi(ORT_API_VERSION); });
  if (api == nullptr) {
    return BackendError(std::string("libonnxruntime ") + OrtGetApiBase()->GetVersionString() +
                        " is older than the ONNX Runtime headers this runtime was built with (C API " +
                        std::to_string(ORT_API_VERSION) + "); install a newer onnxruntime or rebuild against its headers");
  }
  Ort::InitApi(api);
  return Status::Ok();
}

// One Ort::Env per process, shared by every session (per-group bundles open several).
std::shared_ptr<Ort::Env> SharedEnv() {
  static std::mutex mu;
  static std::weak_ptr<Ort::Env> weak;
  std::lock_guard<std::mutex> lock(mu);
  std::shared_ptr<Ort::Env> env = weak.lock();
  if (!env) {
    env = std::make_shared<Ort::Env>(ORT_LOGGING_LEVEL_WARNING, "quest");
    weak = env;
  }
  return env;
}

class OrtBackend : public Backend {
 public:
  explicit OrtBackend(BackendOptions options) : options_(std::move(options)) {}
  ~OrtBackend() override { Deactivate(); }

  std::string name() const override { return "ort(" + options_.model_path + ")"; }

  Status Activate() override {
    if (session_) return Status::Ok();
    QUEST_RETURN_IF_ERROR(InitOrtApi());
    try {
      env_ = SharedEnv();
      Ort::SessionOptions so;
      so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_EXTENDED);
      so.AddConfigEntry(kOrtSessionOptionsDisableSpecifiedOptimizers, "QDQPropagationTransformer,QDQS8ToU8Transformer");
      so.AddConfigEntry(kOrtSessionOptionsQDQMatMulNBitsAccuracyLevel, "0");
      if (options_.intra_op_threads > 0) so.SetIntraOpNumThreads(options_.intra_op_threads);
      session_ = std::make_unique<Ort::Session>(*env_, options_.model_path.c_str(), so);
      Ort::AllocatorWithDefaultOptions alloc;
      input_names_.clear();
      output_names_.clear();
      for (size_t i = 0; i < session_->GetInputCount(); ++i) {
        input_names_.emplace_back(session_->GetInputNameAllocated(i, alloc).get());
        auto type = session_->GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
        if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
          Deactivate();
          return InvalidInput(options_.model_path + ": input '" + input_names_.back() +
                              "' is not float32; the quest runtime feeds float32 graphs (docs/formats.md)");
        }
      }
      for (size_t i = 0; i < session_->GetOutputCount(); ++i) {
        output_names_.emplace_back(session_->GetOutputNameAllocated(i, alloc).get());
        auto type = session_->GetOutputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
        if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
          Deactivate();
          return InvalidInput(options_.model_path + ": output '" + output_names_.back() + "' is not float32");
        }
      }
    } catch (const Ort::Exception& e) {
      session_.reset();
      return BackendError(options_.model_path + ": ONNX Runtime could not load the model: " + e.what());
    }
    return Status::Ok();
  }

  Status Infer(const TensorMap& feeds, TensorMap* outputs) override {
    if (!session_) return InternalError("OrtBackend::Infer called before Activate");
    for (const auto& kv : feeds) {
      bool known = false;
      for (const auto& n : input_names_) known = known || n == kv.first;
      if (!known) return InvalidInput(options_.model_path + ": feed '" + kv.first + "' is not a graph input");
    }
    try {
      Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
      std::vector<Ort::Value> values;
      std::vector<const char*> in_names, out_names;
      for (const auto& n : input_names_) {
        auto it = feeds.find(n);
        if (it == feeds.end()) return InvalidInput(options_.model_path + ": graph input '" + n + "' was not fed");
        const Tensor& t = it->second;
        if (Numel(t.shape) != t.data.size()) return InternalError("feed '" + n + "' data does not match its shape");
        // ORT reads the buffer in place; Run() does not write inputs.
        values.push_back(Ort::Value::CreateTensor<float>(mem, const_cast<float*>(t.data.data()), t.data.size(),
                                                         t.shape.data(), t.shape.size()));
        in_names.push_back(n.c_str());
      }
      for (const auto& n : output_names_) out_names.push_back(n.c_str());
      std::vector<Ort::Value> results = session_->Run(Ort::RunOptions{nullptr}, in_names.data(), values.data(),
                                                      values.size(), out_names.data(), out_names.size());
      outputs->clear();
      for (size_t i = 0; i < results.size(); ++i) {
        auto info = results[i].GetTensorTypeAndShapeInfo();
        Tensor out;
        out.shape = info.GetShape();
        const size_t n = info.GetElementCount();
        const float* p = results[i].GetTensorData<float>();
        out.data.assign(p, p + n);
        (*outputs)[output_names_[i]] = std::move(out);
      }
    } catch (const Ort::Exception& e) {
      return BackendError(options_.model_path + ": ONNX Runtime inference failed: " + e.what());
    }
    return Status::Ok();
  }

  void Deactivate() override {
    session_.reset();
    env_.reset();
  }

  std::vector<std::string> InputNames() const override { return input_names_; }
  std::vector<std::string> OutputNames() const override { return output_names_; }

 private:
  BackendOptions options_;
  std::shared_ptr<Ort::Env> env_;  // declared before session_: destroyed after it
  std::unique_ptr<Ort::Session> session_;
  std::vector<std::string> input_names_, output_names_;
};

}  // namespace

Status CreateOrtBackend(const BackendOptions& options, std::unique_ptr<Backend>* out) {
  *out = std::make_unique<OrtBackend>(options);
  return Status::Ok();
}

std::string OrtBackendVersion() {
  return std::string("libonnxruntime ") + OrtGetApiBase()->GetVersionString() + ", headers C API " +
         std::to_string(ORT_API_VERSION);
}

}  // namespace quest
