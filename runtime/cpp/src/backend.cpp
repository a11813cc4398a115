#include "quest/backend.h"

#include "quest/build_config.h"

namespace quest {

#if QUEST_HAVE_ORT
Status CreateOrtBackend(const BackendOptions& options, std::unique_ptr<Backend>* out);
std::string OrtBackendVersion();
#endif
#if QUEST_HAVE_TRT
Status CreateTrtBackend(const BackendOptions& options, std::unique_ptr<Backend>* out);
std::string TrtBackendVersion();
#endif

bool BackendBuilt(const std::string& kind, std::string* why_not) {
  if (kind == "ort") {
    if (why_not) *why_not = QUEST_ORT_NOTE;
    return QUEST_HAVE_ORT;
  }
  if (kind == "trt") {
    if (why_not) *why_not = QUEST_TRT_NOTE;
    return QUEST_HAVE_TRT;
  }
  if (why_not) *why_not = "unknown backend '" + kind + "'; use ort or trt";
  return false;
}

Status CreateBackend(const std::string& kind, const BackendOptions& options, std::unique_ptr<Backend>* out) {
  std::string note;
  if (!BackendBuilt(kind, &note)) {
    if (kind != "ort" && kind != "trt") return InvalidInput(note);
    return NotBuilt("the " + std::string(kind == "ort" ? "ONNX Runtime" : "TensorRT") +
                    " backend is not part of this build: " + note);
  }
#if QUEST_HAVE_ORT
  if (kind == "ort") return CreateOrtBackend(options, out);
#endif
#if QUEST_HAVE_TRT
  if (kind == "trt") return CreateTrtBackend(options, out);
#endif
  (void)options;
  (void)out;
  return InternalError("backend '" + kind + "' marked as built but not linked");
}

std::string DescribeBackends() {
  std::string s;
#if QUEST_HAVE_ORT
  s += "ort: built (" + OrtBackendVersion() + "; " + QUEST_ORT_NOTE + ")\n";
#else
  s += std::string("ort: not built: ") + QUEST_ORT_NOTE + "\n";
#endif
#if QUEST_HAVE_TRT
  s += "trt: built (" + TrtBackendVersion() + "; " + QUEST_TRT_NOTE + ")\n";
#else
  s += std::string("trt: not built: ") + QUEST_TRT_NOTE + "\n";
#endif
  return s;
}

}  // namespace quest
