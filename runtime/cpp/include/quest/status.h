// Status: the one way the quest runtime reports failure (no exceptions cross its API).
//
// A failed Status carries a one-line message that names the file, tensor or key involved and,
// where there is one, the command that fixes it. Exit codes follow docs/formats.md and the
// Python CLI: 2 for errors the user can fix, 1 for anything else.
#pragma once

#include <string>
#include <utility>

namespace quest {

enum class StatusCode {
  kOk = 0,
  kInvalidInput,      // a file, option or tensor given by the user cannot be used
  kManifestMismatch,  // schema, hash, TensorRT version or compute capability does not match
  kNotBuilt,          // a backend that this build of the runtime does not contain
  kBackendError,      // ONNX Runtime / TensorRT / CUDA reported an error
  kIoError,           // reading or writing a file failed
  kInternal,          // a bug
};

class Status {
 public:
  Status() = default;
  static Status Ok() { return Status(); }
  static Status Error(StatusCode code, std::string message) { return Status(code, std::move(message)); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // Exit code for command-line programs: 2 = the user can fix it, 1 = unexpected.
  int exit_code() const {
    switch (code_) {
      case StatusCode::kOk: return 0;
      case StatusCode::kBackendError:
      case StatusCode::kInternal: return 1;
      default: return 2;
    }
  }

  // Prefix the message with context ("model.onnx: " + message), keeping the code.
  Status WithContext(const std::string& context) const {
    if (ok()) return *this;
    return Status(code_, context + ": " + message_);
  }

 private:
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidInput(std::string m) { return Status::Error(StatusCode::kInvalidInput, std::move(m)); }
inline Status ManifestMismatch(std::string m) { return Status::Error(StatusCode::kManifestMismatch, std::move(m)); }
inline Status NotBuilt(std::string m) { return Status::Error(StatusCode::kNotBuilt, std::move(m)); }
inline Status BackendError(std::string m) { return Status::Error(StatusCode::kBackendError, std::move(m)); }
inline Status IoError(std::string m) { return Status::Error(StatusCode::kIoError, std::move(m)); }
inline Status InternalError(std::string m) { return Status::Error(StatusCode::kInternal, std::move(m)); }

}  // namespace quest

// Return early from a function returning Status.
#define QUEST_RETURN_IF_ERROR(expr)            \
  do {                                         \
    ::quest::Status quest_status_ = (expr);    \
    if (!quest_status_.ok()) return quest_status_; \
  } while (0)
