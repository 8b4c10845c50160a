// SPDX-License-Identifier: Apache-2.0
// The CPU codec's bytes and its bound checks assume IEEE defaults: round to nearest, subnormals
// kept. A host process may run with other settings (flush-to-zero from -ffast-math start-up
// code, a changed rounding mode); each CPU entry point runs under the defaults and restores the
// caller's environment on the way out.
#pragma once

#include <cfenv>

namespace kvc {

class DefaultFloatEnvironment {
 public:
  DefaultFloatEnvironment() {
    std::fegetenv(&saved_);
    std::fesetenv(FE_DFL_ENV);
  }
  ~DefaultFloatEnvironment() { std::fesetenv(&saved_); }
  DefaultFloatEnvironment(const DefaultFloatEnvironment&) = delete;
  DefaultFloatEnvironment& operator=(const DefaultFloatEnvironment&) = delete;

 private:
  std::fenv_t saved_;
};

}  // namespace kvc
