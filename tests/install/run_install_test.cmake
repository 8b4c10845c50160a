# SPDX-License-Identifier: Apache-2.0
# Installs the build into a fresh prefix, then builds and runs programs against that prefix only:
#   1. tests/install/consumer through find_package(kvcomp CONFIG) (shared and static targets, and
#      a C++20 program over the wrapper kvcomp.hpp);
#   2. the same consumer through pkg-config (shared, and static with Libs.private);
#   3. examples/ as a standalone project, when examples/compress_block.c exists.
# Run by ctest (tests/install/CMakeLists.txt) with the variables below.
cmake_minimum_required(VERSION 3.24)
foreach(_var KVC_SOURCE_DIR KVC_BUILD_DIR KVC_WORK_DIR KVC_GENERATOR KVC_C_COMPILER
             KVC_CXX_COMPILER KVC_VERSION KVC_LIBDIR)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "run_install_test.cmake: ${_var} is not set")
  endif()
endforeach()

set(_prefix "${KVC_WORK_DIR}/prefix")
file(REMOVE_RECURSE "${KVC_WORK_DIR}")
file(MAKE_DIRECTORY "${KVC_WORK_DIR}")

function(kvc_run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${_rc}):\n${ARGN}\n${_out}")
  endif()
  message(STATUS "${what}: ok")
  set(kvc_run_output "${_out}" PARENT_SCOPE)
endfunction()

# ---- 1. Install ------------------------------------------------------------------------------
set(_config_args)
if(KVC_CONFIG)
  set(_config_args --config "${KVC_CONFIG}")
endif()
kvc_run("install" "${CMAKE_COMMAND}" --install "${KVC_BUILD_DIR}" --prefix "${_prefix}"
        ${_config_args})

set(_lib "${_prefix}/${KVC_LIBDIR}")
string(REGEX MATCH "^[0-9]+\\.[0-9]+" _major_minor "${KVC_VERSION}")
foreach(_file
    include/kvcomp/kvcomp.h
    ${KVC_LIBDIR}/libkvcomp.so
    ${KVC_LIBDIR}/libkvcomp.so.${KVC_VERSION}
    ${KVC_LIBDIR}/libkvcomp.a
    ${KVC_LIBDIR}/cmake/kvcomp/kvcompConfig.cmake
    ${KVC_LIBDIR}/cmake/kvcomp/kvcompConfigVersion.cmake
    ${KVC_LIBDIR}/cmake/kvcomp/kvcompTargets.cmake
    ${KVC_LIBDIR}/pkgconfig/kvcomp.pc)
  if(NOT EXISTS "${_prefix}/${_file}")
    message(FATAL_ERROR "not installed: ${_file}")
  endif()
endforeach()
# Every public header is installed, and nothing from src/ or kernels/.
file(GLOB _public RELATIVE "${KVC_SOURCE_DIR}/include" "${KVC_SOURCE_DIR}/include/kvcomp/*.h"
     "${KVC_SOURCE_DIR}/include/kvcomp/*.hpp")
file(GLOB_RECURSE _installed RELATIVE "${_prefix}/include" "${_prefix}/include/*")
list(SORT _public)
list(SORT _installed)
if(NOT _public STREQUAL _installed)
  message(FATAL_ERROR "installed headers [${_installed}] differ from the public ones [${_public}]")
endif()

# Programs run against the prefix; CUDA's runtime where the toolkit put it.
set(_env "LD_LIBRARY_PATH=${_lib}")
if(KVC_CUDA_LIBRARY_DIR)
  set(_env "LD_LIBRARY_PATH=${_lib}:${KVC_CUDA_LIBRARY_DIR}")
endif()

# What a user's build of this toolchain passes: compilers, generator, and the flags of this
# build (sanitizer builds need them in every executable).
set(_common_args -G "${KVC_GENERATOR}"
  "-DCMAKE_C_COMPILER=${KVC_C_COMPILER}"
  "-DCMAKE_CXX_COMPILER=${KVC_CXX_COMPILER}"
  "-DCMAKE_C_FLAGS=${KVC_C_FLAGS}"
  "-DCMAKE_CXX_FLAGS=${KVC_CXX_FLAGS}"
  "-DCMAKE_EXE_LINKER_FLAGS=${KVC_EXE_LINKER_FLAGS}"
  "-DCMAKE_BUILD_TYPE=${KVC_CONFIG}"
  "-DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF"
  "-DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF")
if(KVC_MAKE_PROGRAM)
  list(APPEND _common_args "-DCMAKE_MAKE_PROGRAM=${KVC_MAKE_PROGRAM}")
endif()
if(KVC_CUDA_TOOLKIT_ROOT)
  list(APPEND _common_args "-DCUDAToolkit_ROOT=${KVC_CUDA_TOOLKIT_ROOT}")
endif()

function(kvc_build_and_run name source_dir)
  set(_bin "${KVC_WORK_DIR}/${name}")
  kvc_run("${name}: configure" "${CMAKE_COMMAND}" -E env "PKG_CONFIG_PATH=${_lib}/pkgconfig"
          "${CMAKE_COMMAND}" -S "${source_dir}" -B "${_bin}" ${_common_args}
          "-DCMAKE_PREFIX_PATH=${_prefix}" ${ARGN})
  kvc_run("${name}: build" "${CMAKE_COMMAND}" --build "${_bin}" ${_config_args})
  set(kvc_bin "${_bin}" PARENT_SCOPE)
endfunction()

function(kvc_run_program name program)
  if(NOT EXISTS "${program}")
    message(FATAL_ERROR "${name}: ${program} was not built")
  endif()
  kvc_run("${name}: run" "${CMAKE_COMMAND}" -E env "${_env}" "${program}")
  message(STATUS "  ${kvc_run_output}")
endfunction()

# ---- 2. find_package(kvcomp CONFIG) ----------------------------------------------------------
kvc_build_and_run(find_package "${KVC_SOURCE_DIR}/tests/install/consumer"
                  -DCONSUMER_USE_PKG_CONFIG=OFF "-DCONSUMER_EXPECTED_PREFIX=${_prefix}")
kvc_run_program(find_package_shared "${kvc_bin}/consumer_shared")
kvc_run_program(find_package_static "${kvc_bin}/consumer_static")
kvc_run_program(find_package_cpp "${kvc_bin}/consumer_cpp")

# ---- 3. pkg-config ---------------------------------------------------------------------------
if(KVC_PKG_CONFIG)
  kvc_run("pkg-config --modversion" "${CMAKE_COMMAND}" -E env "PKG_CONFIG_PATH=${_lib}/pkgconfig"
          "${KVC_PKG_CONFIG}" --modversion kvcomp)
  string(STRIP "${kvc_run_output}" _pc_version)
  if(NOT _pc_version STREQUAL KVC_VERSION)
    message(FATAL_ERROR "kvcomp.pc says version ${_pc_version}, the build ${KVC_VERSION}")
  endif()
  kvc_run("pkg-config --static --libs" "${CMAKE_COMMAND}" -E env
          "PKG_CONFIG_PATH=${_lib}/pkgconfig" "${KVC_PKG_CONFIG}" --static --libs kvcomp)
  if(NOT kvc_run_output MATCHES "-lkvcomp" OR NOT kvc_run_output MATCHES "-lm( |$|\n)")
    message(FATAL_ERROR "pkg-config --static --libs kvcomp: ${kvc_run_output}")
  endif()
  kvc_build_and_run(pkg_config "${KVC_SOURCE_DIR}/tests/install/consumer"
                    -DCONSUMER_USE_PKG_CONFIG=ON "-DCONSUMER_EXPECTED_PREFIX=${_prefix}"
                    "-DPKG_CONFIG_EXECUTABLE=${KVC_PKG_CONFIG}")
  kvc_run_program(pkg_config_shared "${kvc_bin}/consumer_shared")
  kvc_run_program(pkg_config_static "${kvc_bin}/consumer_static")
else()
  message(FATAL_ERROR "pkg-config was not found; install it (apt-get install pkg-config)")
endif()

# ---- 4. The examples, as a user builds them --------------------------------------------------
set(_examples "${KVC_SOURCE_DIR}/examples")
if(EXISTS "${_examples}/compress_block.c" AND EXISTS "${_examples}/CMakeLists.txt")
  kvc_build_and_run(examples "${_examples}")
  file(GLOB_RECURSE _programs "${kvc_bin}/compress_block" "${kvc_bin}/compress_block.exe")
  if(NOT _programs)
    message(FATAL_ERROR "examples: compress_block was not built")
  endif()
  list(GET _programs 0 _program)
  kvc_run_program(compress_block "${_program}")
else()
  message(STATUS "examples/compress_block.c not present; skipped")
endif()
