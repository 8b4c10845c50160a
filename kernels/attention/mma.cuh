// SPDX-License-Identifier: Apache-2.0
// Warp-level tensor-core primitives of the decode-attention kernels: the fragment layouts of
// mma.sync.aligned.m16n8k16 (host-callable, so the CPU tests check the index math the kernels
// rely on), and thin wrappers over mma, ldmatrix and cp.async.
//
// Layouts, from the PTX ISA ("Matrix fragments for mma.m16n8k16 with floating point type"),
// with lane = 4 * groupID + threadID_in_group:
//   A, 16x16 row-major, 8 halves in 4 registers;  B, 16x8 "col", 4 halves in 2 registers;
//   C/D, 16x8 fp32, 4 floats.
#pragma once

#include <cstdint>

#include "kernels/common/format.cuh"  // KVC_HD

namespace kvc::kernels::mma {

struct Coord {
  uint32_t row, col;
};

// Element i (0..7; register i / 2, half i % 2) of a lane's A fragment.
KVC_HD constexpr Coord a_coord(uint32_t lane, uint32_t i) {
  return {lane / 4 + 8 * ((i / 2) % 2), (lane % 4) * 2 + i % 2 + 8 * (i / 4)};
}

// Element i (0..3; register i / 2, half i % 2) of a lane's B fragment: row = k, col = n.
KVC_HD constexpr Coord b_coord(uint32_t lane, uint32_t i) {
  return {(lane % 4) * 2 + i % 2 + 8 * (i / 2), lane / 4};
}

// Element i (0..3) of a lane's C/D fragment.
KVC_HD constexpr Coord c_coord(uint32_t lane, uint32_t i) {
  return {lane / 4 + 8 * (i / 2), (lane % 4) * 2 + i % 2};
}

// What ldmatrix gives a lane of one 8x8 matrix of 16-bit elements: halves h = 0, 1 of its
// register are (row, col) of the matrix as stored (rows at the addresses lanes 8j..8j+7 pass
// for matrix j); with .trans, (col, row).
KVC_HD constexpr Coord ldmatrix_coord(uint32_t lane, uint32_t h, bool trans) {
  const Coord c{lane / 4, (lane % 4) * 2 + h};
  return trans ? Coord{c.col, c.row} : c;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a shared-memory tile whose rows are
// `row_bytes` long (a multiple of 128): chunks are XOR-swizzled over groups of eight rows, so
// the eight rows an ldmatrix phase reads hit all 32 banks once.
KVC_HD constexpr uint32_t swizzled_offset(uint32_t row, uint32_t chunk, uint32_t row_bytes) {
  return row * row_bytes + ((chunk ^ (row % 8)) * 16);
}

#if defined(__CUDACC__)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kvcomp's attention kernels need sm_80 or newer (bf16 mma, cp.async)"
#endif

// D += A * B with fp32 accumulation; A and B fp16 (BF16 = false) or bf16.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices; lane 8j + r passes row r of matrix j.
template <bool Trans>
__device__ __forceinline__ uint4 ldmatrix_x4(const void* row) {
  uint4 r;
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "r"(shared_address(row)));
  }
  return r;
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#endif  // __CUDACC__

}  // namespace kvc::kernels::mma
