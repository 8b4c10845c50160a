// SPDX-License-Identifier: Apache-2.0
// The few device facilities the kernels reach through a name of kvcomp's own, so that the same
// kernel sources compile under nvcc and under the host emulation of the tests
// (tests/emulation/device_emulation.hpp, which must be included first and defines
// KVC_DEVICE_EMULATION along with CUDA's keywords, built-in variables, barriers, warp
// collectives and atomics). Everything else in the kernels is plain CUDA C++.
//
//   KVC_DYNAMIC_SHARED(type, name)   the block's dynamic shared memory as `type* name`
//   kvc::device::BlockScan<T, N>     CUB's BlockScan (kvcomp's wrapped namespace)
//
// Adding a facility (a warp-level matrix instruction, ldmatrix, cp.async): name it here, with
// the CUDA definition below and the emulation's in the test header; see docs/emulation.md.
#pragma once

#if !defined(KVC_DEVICE_EMULATION)

#include <cub/block/block_scan.cuh>

#define KVC_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]

namespace kvc::device {

template <class T, int kThreads>
using BlockScan = CUB_NS_QUALIFIER::BlockScan<T, kThreads>;  // kvcomp's wrapped CUB

}  // namespace kvc::device

#endif
