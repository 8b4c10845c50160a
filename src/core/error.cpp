// SPDX-License-Identifier: Apache-2.0
#include "core/error.hpp"

namespace kvc {
namespace {
thread_local std::string t_last_error;
}

void set_last_error(const char* function, const char* prefix, const char* message) noexcept {
  try {
    t_last_error.assign(function).append(": ").append(prefix).append(message);
  } catch (...) {
    t_last_error.clear();  // no memory for the message: an empty one beats none
  }
}

const char* last_error() noexcept { return t_last_error.c_str(); }

void clear_last_error() noexcept { t_last_error.clear(); }

}  // namespace kvc
