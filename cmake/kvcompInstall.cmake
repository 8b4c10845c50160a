# SPDX-License-Identifier: Apache-2.0
# Install rules: public headers, libkvcomp.so (versioned) and libkvcomp.a, the CMake package
# (find_package(kvcomp CONFIG) -> kvcomp::kvcomp, kvcomp::kvcomp_static) and kvcomp.pc.
include(CMakePackageConfigHelpers)

set(KVC_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/kvcomp" CACHE STRING
    "Where kvcompConfig.cmake is installed, relative to the prefix")
set(KVC_INSTALL_PKGCONFIGDIR "${CMAKE_INSTALL_LIBDIR}/pkgconfig" CACHE STRING
    "Where kvcomp.pc is installed, relative to the prefix")

install(TARGETS kvcomp kvcomp_static
  EXPORT kvcompTargets
  RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}"
  LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}"
  ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}"
  INCLUDES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/kvcomp"
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
  FILES_MATCHING PATTERN "*.h" PATTERN "*.hpp")

install(EXPORT kvcompTargets
  NAMESPACE kvcomp::
  FILE kvcompTargets.cmake
  DESTINATION "${KVC_INSTALL_CMAKEDIR}")
configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/kvcompConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/kvcompConfig.cmake"
  INSTALL_DESTINATION "${KVC_INSTALL_CMAKEDIR}")
# 0.x: a minor release may break the API, so only the same major.minor is compatible.
if(PROJECT_VERSION_MAJOR EQUAL 0)
  set(_kvc_compatibility SameMinorVersion)
else()
  set(_kvc_compatibility SameMajorVersion)
endif()
write_basic_package_version_file("${PROJECT_BINARY_DIR}/kvcompConfigVersion.cmake"
  COMPATIBILITY ${_kvc_compatibility})
install(FILES "${PROJECT_BINARY_DIR}/kvcompConfig.cmake"
              "${PROJECT_BINARY_DIR}/kvcompConfigVersion.cmake"
  DESTINATION "${KVC_INSTALL_CMAKEDIR}")

# pkg-config. The file locates the prefix relative to itself (${pcfiledir}), so it stays right
# under `cmake --install --prefix <dir>` and when the tree is moved.
if(IS_ABSOLUTE "${KVC_INSTALL_PKGCONFIGDIR}")
  set(KVC_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  file(RELATIVE_PATH _kvc_up "/kvc_prefix/${KVC_INSTALL_PKGCONFIGDIR}" "/kvc_prefix")
  string(REGEX REPLACE "/$" "" _kvc_up "${_kvc_up}")
  set(KVC_PC_PREFIX "\${pcfiledir}/${_kvc_up}")
endif()
foreach(_kvc_dir LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${_kvc_dir}}")
    set(KVC_PC_${_kvc_dir} "${CMAKE_INSTALL_${_kvc_dir}}")
  else()
    set(KVC_PC_${_kvc_dir} "\${prefix}/${CMAKE_INSTALL_${_kvc_dir}}")
  endif()
endforeach()
# A static C consumer links the C++ runtime itself (src/CMakeLists.txt: KVC_CXX_RUNTIME_LIBS).
set(_kvc_private_libs ${KVC_CXX_RUNTIME_LIBS})
list(TRANSFORM _kvc_private_libs PREPEND "-l")
if(KVC_WITH_CUDA)
  list(PREPEND _kvc_private_libs "-L${CUDAToolkit_LIBRARY_DIR}" -lcudart)
endif()
list(JOIN _kvc_private_libs " " KVC_PC_LIBS_PRIVATE)
configure_file("${PROJECT_SOURCE_DIR}/cmake/kvcomp.pc.in" "${PROJECT_BINARY_DIR}/kvcomp.pc"
               @ONLY)
install(FILES "${PROJECT_BINARY_DIR}/kvcomp.pc" DESTINATION "${KVC_INSTALL_PKGCONFIGDIR}")
