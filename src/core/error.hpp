// SPDX-License-Identifier: Apache-2.0
// Internal errors: thrown inside the library, turned into a kvc_status and a per-thread message
// at the C ABI by api_call. Nothing here escapes the library.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

namespace kvc {

class Error : public std::exception {
 public:
  Error(kvc_status_t status, std::string message) : status_(status), message_(std::move(message)) {}
  kvc_status_t status() const noexcept { return status_; }
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  kvc_status_t status_;
  std::string message_;
};

template <class... Parts>
[[noreturn]] void fail(kvc_status_t status, const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  throw Error(status, out.str());
}

template <class... Parts>
void require(bool condition, kvc_status_t status, const Parts&... parts) {
  if (!condition) fail(status, parts...);
}

template <class T>
T* require_not_null(T* p, const char* name) {
  require(p != nullptr, KVC_ERROR_NULL_POINTER, name, " is NULL");
  return p;
}

// Keeps "function: prefix message" as this thread's last error. It allocates, and memory may be
// what just ran out: then the message is left empty, as nothing may escape a handler.
void set_last_error(const char* function, const char* prefix, const char* message) noexcept;
const char* last_error() noexcept;
void clear_last_error() noexcept;

// Runs one API body: every exception becomes a status, with "function: message" kept as this
// thread's last error.
template <class Body>
kvc_status_t api_call(const char* function, Body&& body) noexcept {
  try {
    body();
    return KVC_SUCCESS;
  } catch (const Error& e) {
    set_last_error(function, "", e.what());
    return e.status();
  } catch (const std::bad_alloc&) {
    set_last_error(function, "out of host memory", "");
    return KVC_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_last_error(function, "internal error: ", e.what());
    return KVC_ERROR_INTERNAL;
  } catch (...) {
    set_last_error(function, "internal error: unknown exception", "");
    return KVC_ERROR_INTERNAL;
  }
}

// An enum argument as the integer a C caller passed. C lets any int32 travel in a kvcomp enum type,
// negative values included, but in C++ reading an enum object whose value lies outside the range
// of its enumerators (here [0, 2^31 - 1]) is undefined. So the argument's bytes are read as an
// integer; only a value validated as such is converted back to the enum.
template <class E>
int32_t c_enum_value(const E& e) noexcept {
  static_assert(std::is_enum_v<E> && sizeof(E) == sizeof(int32_t));
  int32_t v;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

// Checks the struct_size/abi_version pair every public config struct starts with.
template <class Config>
void check_struct_header(const Config& c, const char* name) {
  require(c.abi_version == KVC_ABI_VERSION, KVC_ERROR_ABI_MISMATCH, name,
          "->abi_version = ", c.abi_version, " but this library implements ABI version ",
          KVC_ABI_VERSION);
  require(c.struct_size == sizeof(Config), KVC_ERROR_ABI_MISMATCH, name,
          "->struct_size = ", c.struct_size, " but this library expects ", sizeof(Config),
          " (initialise the struct with its _INIT macro)");
}

}  // namespace kvc
