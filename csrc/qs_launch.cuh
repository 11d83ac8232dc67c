// Host-side helpers shared by the launchers: device properties and per-kernel occupancy, cached
// per device (looked up once; later launches, CUDA-graph captures included, only read the cache).
#pragma once

#include <cuda_runtime.h>

namespace qs {

constexpr int kMaxDevices = 64;

// Groups a chunk of U k16 steps meets (the GEMV's scale rows a chunk loads, the wgmma GEMM's group
// slots a stage fills; host and device): groups are 2^group_shift steps (group_shift >= 30: one
// group), so max(1, U >> group_shift), never shifting by 3 or more.
template <int U>
__host__ __device__ __forceinline__ int groups_per_chunk(int group_shift) {
  static_assert(U >= 1 && U <= 8, "chunks of 1-8 k16 steps");
  return group_shift >= 3 || (1 << group_shift) >= U ? 1 : U >> group_shift;
}

struct DeviceInfo {
  int sms = 0;
  int max_smem_optin = 0;
  int cc_major = 0;
};

inline cudaError_t device_info(DeviceInfo* out, int* device) {
  static DeviceInfo cache[kMaxDevices];
  cudaError_t err = cudaGetDevice(device);
  if (err != cudaSuccess) return err;
  if (*device < 0 || *device >= kMaxDevices) return cudaErrorInvalidDevice;
  DeviceInfo& d = cache[*device];
  if (d.sms == 0) {
    int sms = 0, smem = 0;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, *device);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, *device);
    if (err != cudaSuccess) return err;
    int major = 0;
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, *device);
    if (err != cudaSuccess) return err;
    d.cc_major = major;
    d.max_smem_optin = smem;
    d.sms = sms;
  }
  *out = d;
  return cudaSuccess;
}

// Launch `cfg` with programmatic dependent launch when `on` (sm_90+: the kernel may start while the
// previous one in the stream runs, and must griddepcontrol.wait before reading its outputs). `attr`
// is the attribute storage cfg points to: it must live until the launch.
inline void set_pdl(cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr, bool on) {
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = on ? 1 : 0;
}

// Resident blocks per SM of `kernel` with `threads` and `smem` dynamic bytes; raises the kernel's
// dynamic shared memory limit first when needed. Cached per (kernel instantiation, device) by
// the caller's static slot.
template <typename Kernel>
inline cudaError_t resident_blocks(Kernel kernel, int threads, int smem, int device, int (&slot)[kMaxDevices],
                                   int* blocks_per_sm) {
  if (slot[device] == 0) {
    cudaError_t err;
    if (smem > 48 * 1024) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) return err;
    }
    int occ = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, threads, smem);
    if (err != cudaSuccess) return err;
    if (occ < 1) return cudaErrorInvalidConfiguration;
    slot[device] = occ;
  }
  *blocks_per_sm = slot[device];
  return cudaSuccess;
}

// Launch shape of a cp.async-pipelined kernel on the current device: the deepest pipeline from
// `most` stages down to 3 whose shared memory (smem_of(stages) bytes) fits the device, and the
// resident blocks per SM at that depth. Cached per device in the caller's static slots.
struct PipelineShape {
  DeviceInfo dev;
  int device = 0, stages = 0, smem = 0, occ = 0;
};

template <typename Kernel, typename SmemOf>
inline cudaError_t pipeline_shape(Kernel kernel, int threads, int most, SmemOf smem_of, int (&stage_slot)[kMaxDevices],
                                  int (&occ_slot)[kMaxDevices], PipelineShape* out) {
  cudaError_t err = device_info(&out->dev, &out->device);
  if (err != cudaSuccess) return err;
  if (stage_slot[out->device] == 0) {
    int stages = most;
    while (stages > 3 && smem_of(stages) > out->dev.max_smem_optin) --stages;
    if (smem_of(stages) > out->dev.max_smem_optin) return cudaErrorInvalidConfiguration;
    stage_slot[out->device] = stages;
  }
  out->stages = stage_slot[out->device];
  out->smem = smem_of(out->stages);
  return resident_blocks(kernel, threads, out->smem, out->device, occ_slot, &out->occ);
}

}  // namespace qs
