// Minimal "--key value" / "--flag" parsing shared by the command-line programs.
#pragma once

#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "quest/status.h"

namespace quest::cli {

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> options;  // "--n" -> "16"
  std::set<std::string> flags;                 // "--check"

  bool has(const std::string& k) const { return options.count(k) > 0; }
  std::string get(const std::string& k, const std::string& def = "") const {
    auto it = options.find(k);
    return it == options.end() ? def : it->second;
  }
  bool flag(const std::string& k) const { return flags.count(k) > 0; }
};

// `value_options` take a value; `flag_options` do not; anything else starting with "--" is an error.
inline Status ParseArgs(int argc, char** argv, int first, const std::set<std::string>& value_options,
                        const std::set<std::string>& flag_options, Args* out) {
  Args a;
  for (int i = first; i < argc; ++i) {
    std::string s = argv[i];
    if (s.rfind("--", 0) == 0 && s.size() > 2) {
      std::string key = s, value;
      size_t eq = s.find('=');
      bool inline_value = eq != std::string::npos;
      if (inline_value) {
        key = s.substr(0, eq);
        value = s.substr(eq + 1);
      }
      if (flag_options.count(key)) {
        if (inline_value) return InvalidInput(key + " takes no value");
        a.flags.insert(key);
      } else if (value_options.count(key)) {
        if (!inline_value) {
          if (i + 1 >= argc) return InvalidInput(key + " needs a value");
          value = argv[++i];
        }
        a.options[key] = value;
      } else {
        return InvalidInput("unknown option " + key);
      }
    } else {
      a.positional.push_back(s);
    }
  }
  *out = std::move(a);
  return Status::Ok();
}

inline Status ToInt(const std::string& key, const std::string& text, int64_t* out) {
  char* end = nullptr;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0') return InvalidInput(key + " needs an integer, got '" + text + "'");
  *out = v;
  return Status::Ok();
}

inline Status ToDouble(const std::string& key, const std::string& text, double* out) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0') return InvalidInput(key + " needs a number, got '" + text + "'");
  *out = v;
  return Status::Ok();
}

// "1,2,3" -> {1, 2, 3}
inline Status ToIntList(const std::string& key, const std::string& text, std::vector<int64_t>* out) {
  out->clear();
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    int64_t v = 0;
    QUEST_RETURN_IF_ERROR(ToInt(key, text.substr(start, end - start), &v));
    out->push_back(v);
    start = end + 1;
  }
  return Status::Ok();
}

inline Status ToDoubleList(const std::string& key, const std::string& text, std::vector<double>* out) {
  out->clear();
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    double v = 0;
    QUEST_RETURN_IF_ERROR(ToDouble(key, text.substr(start, end - start), &v));
    out->push_back(v);
    start = end + 1;
  }
  return Status::Ok();
}

}  // namespace quest::cli
