// onnxruntime custom-op library: com.ulsexport DecodeMatMul on the CUDA provider.
//
// DecodeMatMul(X [..., K] fp16, Wt [F, K] fp16) -> Y [..., F] = X @ Wt^T: a MatMul by a weight held
// transposed. With the attribute swiglu=1, Wt is a gated MLP's gate and up projections stacked
// ([2F, K]: gate rows, then up rows) and Y [..., F] = silu(X @ gate^T) * (X @ up^T).
//
// A decode step's few rows (at most kGemvRows; K a multiple of 8, X and Wt 16-byte aligned) run
// `gemv_kernel`: a warp per two weight rows (two features, or a feature's gate and up), each lane
// reading 16 bytes of each per step, so that a warp reads 512 contiguous bytes of a row at a time; fp32
// accumulation, as cuBLAS accumulates, and gated, the SiLU and product in fp32 before the one rounding.
// Other shapes (a prompt, a larger batch) run cuBLAS, which is then as fast or compute bound, and where
// gated a SwiGLU kernel after it over cuBLAS's fp16 gate and up.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

namespace {

constexpr int kGemvRows = 2;     // X rows up to which the GEMV beats cuBLAS (measured on the H200)
constexpr int kWarpsPerBlock = 4;
constexpr int kUnroll = 4;       // 16-byte loads of each weight row a lane has in flight
constexpr int kKMultiple = 8;    // K in whole 16-byte chunks
constexpr size_t kCublasWorkspace = 32u << 20;

__device__ __forceinline__ uint4 load_once(const half* p) {  // weights: read once, not kept in L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

// Y[m, f] for m < M: warp `f / 2` of the grid (plain: features f and f + 1, rows f and f + 1 of Wt;
// gated: feature f alone, its gate row f and up row f + features).
template <int M, bool kGated>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gemv_kernel(const half* __restrict__ x,
                                                                    const half* __restrict__ w,
                                                                    half* __restrict__ y, int features, int k) {
  const int lane = threadIdx.x & 31;
  const int pair = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  const int feature = kGated ? pair : 2 * pair;
  if (feature >= features) return;
  // an odd count leaves the last warp one row: it reads that row twice (no branch in the loop) and writes once
  const bool second = kGated || feature + 1 < features;
  const half* rows[2] = {w + static_cast<size_t>(feature) * k,
                         w + static_cast<size_t>(kGated ? feature + features : feature + second) * k};
  const int chunks = k / kKMultiple;
  float acc[M][2];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = 0.f;
  for (int first = lane; first < chunks; first += 32 * kUnroll) {
    uint4 wv[kUnroll][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + 32 * u;
#pragma unroll
      for (int r = 0; r < 2; ++r) wv[u][r] = c < chunks ? load_once(rows[r] + kKMultiple * c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + 32 * u;
      if (c >= chunks) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * k + kKMultiple * c));
        const half2* xh = reinterpret_cast<const half2*>(&xv);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const half2* wh = reinterpret_cast<const half2*>(&wv[u][r]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 xf = __half22float2(xh[j]), wf = __half22float2(wh[j]);
            acc[m][r] = fmaf(xf.x, wf.x, fmaf(xf.y, wf.y, acc[m][r]));
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], offset);
    if (lane != 0) continue;
    half* out = y + static_cast<size_t>(m) * features + feature;
    if (kGated) {
      out[0] = __float2half_rn(silu(acc[m][0]) * acc[m][1]);
    } else {
      out[0] = __float2half_rn(acc[m][0]);
      if (second) out[1] = __float2half_rn(acc[m][1]);
    }
  }
}

// y[m, f] = silu(gu[m, f]) * gu[m, features + f]: the gate and up halves of cuBLAS's [rows, 2F] product
__global__ void swiglu_kernel(const half* __restrict__ gu, half* __restrict__ y, int64_t rows, int features) {
  const int64_t total = rows * features;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / features, f = i % features;
    const half* row = gu + m * 2 * features;
    y[i] = __float2half_rn(silu(__half2float(row[f])) * __half2float(row[features + f]));
  }
}

template <bool kGated>
void launch_gemv(const half* x, const half* w, half* y, int rows, int features, int k, cudaStream_t stream) {
  const int pairs = kGated ? features : (features + 1) / 2;
  const unsigned blocks = static_cast<unsigned>((pairs + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (rows == 1)
    gemv_kernel<1, kGated><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(x, w, y, features, k);
  else
    gemv_kernel<2, kGated><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(x, w, y, features, k);
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Ort::Exception(std::string("ulsexport DecodeMatMul: ") + what + ": " + cudaGetErrorString(status), ORT_FAIL);
}

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw Ort::Exception(std::string("ulsexport DecodeMatMul: ") + what + " failed (cuBLAS status " +
                             std::to_string(static_cast<int>(status)) + ")", ORT_FAIL);
}

// one cuBLAS handle per thread and device, with a workspace of its own, so that cuBLAS allocates nothing
// when a run is captured (the handle is made at a thread's first product on the device: in onnxruntime's
// decoding that is the prompt's, which runs uncaptured); freed when the thread ends
cublasHandle_t cublas_for(int device) {
  struct Handle {
    cublasHandle_t handle = nullptr;
    void* workspace = nullptr;
    ~Handle() {
      if (handle != nullptr) cublasDestroy(handle);
      if (workspace != nullptr) cudaFree(workspace);
    }
  };
  static thread_local std::map<int, Handle> handles;  // a map's entries stay where they are made
  Handle& h = handles[device];
  if (h.handle == nullptr) {
    check(cublasCreate(&h.handle), "cublasCreate");
    check(cudaMalloc(&h.workspace, kCublasWorkspace), "cuBLAS workspace");
    check(cublasSetWorkspace(h.handle, h.workspace, kCublasWorkspace), "cublasSetWorkspace");
  }
  return h.handle;
}

// out [rows, n] = x [rows, k] @ w [n, k]^T; column-major, that is out^T [n, rows] = w^T x^T
void cublas_product(const half* x, const half* w, half* out, int64_t rows, int64_t n, int64_t k, cudaStream_t stream) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  cublasHandle_t handle = cublas_for(device);
  check(cublasSetStream(handle, stream), "cublasSetStream");
  const float one = 1.f, zero = 0.f;
  check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(rows), static_cast<int>(k),
                     &one, w, CUDA_R_16F, static_cast<int>(k), x, CUDA_R_16F, static_cast<int>(k), &zero, out,
                     CUDA_R_16F, static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}

// a scratch buffer from onnxruntime's allocator for the device, freed and the allocator released when it goes
// out of scope, once the kernels that use it are queued: as onnxruntime's own kernels free their scratch
// (the arena hands it out again to work queued after them on the same stream)
class Scratch {
 public:
  Scratch(Ort::KernelContext& ctx, int device, size_t bytes) {
    Ort::MemoryInfo memory("Cuda", OrtDeviceAllocator, device, OrtMemTypeDefault);
    allocator_ = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(memory));
    data_ = allocator_->Alloc(allocator_, bytes);
    if (data_ == nullptr) {
      Ort::GetApi().ReleaseAllocator(allocator_);
      throw Ort::Exception("ulsexport DecodeMatMul: no device memory for the gate and up product", ORT_FAIL);
    }
  }
  ~Scratch() {
    allocator_->Free(allocator_, data_);
    Ort::GetApi().ReleaseAllocator(allocator_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  half* data() const { return static_cast<half*>(data_); }

 private:
  OrtAllocator* allocator_ = nullptr;
  void* data_ = nullptr;
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct DecodeMatMulKernel {
  bool gated = false;

  DecodeMatMulKernel(const OrtApi& api, const OrtKernelInfo* info) {
    int64_t swiglu = 0;
    OrtStatus* missing = api.KernelInfoGetAttribute_int64(info, "swiglu", &swiglu);
    if (missing != nullptr) api.ReleaseStatus(missing);  // absent: a plain product
    gated = missing == nullptr && swiglu != 0;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
    return nullptr;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue x = ctx.GetInput(0), w = ctx.GetInput(1);
    std::vector<int64_t> x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
    std::vector<int64_t> w_shape = w.GetTensorTypeAndShapeInfo().GetShape();
    if (x_shape.empty() || w_shape.size() != 2 || w_shape[1] != x_shape.back() || (gated && w_shape[0] % 2))
      throw Ort::Exception("ulsexport DecodeMatMul: X [..., K] and Wt [F, K] (gated: [2F, K]) do not match",
                           ORT_INVALID_ARGUMENT);
    const int64_t k = x_shape.back(), weight_rows = w_shape[0], features = gated ? weight_rows / 2 : weight_rows;
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < x_shape.size(); ++i) rows *= x_shape[i];
    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = features;
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    if (rows == 0 || features == 0) return;
    auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    auto x_data = static_cast<const half*>(x.GetTensorRawData());
    auto w_data = static_cast<const half*>(w.GetTensorRawData());
    auto y_data = static_cast<half*>(y.GetTensorMutableRawData());
    if (k == 0) {  // an empty sum
      check(cudaMemsetAsync(y_data, 0, sizeof(half) * rows * features, stream), "cudaMemsetAsync");
      return;
    }
    if (rows <= kGemvRows && k % kKMultiple == 0 && aligned16(x_data) && aligned16(w_data)) {
      (gated ? launch_gemv<true> : launch_gemv<false>)(x_data, w_data, y_data, static_cast<int>(rows),
                                                        static_cast<int>(features), static_cast<int>(k), stream);
      check(cudaGetLastError(), "GEMV launch");
      return;
    }
    if (!gated) {
      cublas_product(x_data, w_data, y_data, rows, weight_rows, k, stream);
      return;
    }
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    Scratch gate_up(ctx, device, sizeof(half) * rows * weight_rows);
    cublas_product(x_data, w_data, gate_up.data(), rows, weight_rows, k, stream);
    swiglu_kernel<<<1024, 256, 0, stream>>>(gate_up.data(), y_data, rows, static_cast<int>(features));
    check(cudaGetLastError(), "SwiGLU launch");
  }
};

struct DecodeMatMulOp : Ort::CustomOpBase<DecodeMatMulOp, DecodeMatMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    *kernel = new DecodeMatMulKernel(api, info);
    return nullptr;
  }
  const char* GetName() const { return "DecodeMatMul"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; }
};

std::mutex domains_lock;
std::vector<Ort::CustomOpDomain> domains;  // each session's registration, alive as long as the library

}  // namespace

extern "C" {

// the entry point onnxruntime's register_custom_ops_library calls
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)  // an onnxruntime older than the headers built against; CreateStatus is in every version
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, ("ulsexport's kernels were built for onnxruntime API " + std::to_string(ORT_API_VERSION) +
                   " or newer; this onnxruntime is " + api_base->GetVersionString()).c_str());
  Ort::InitApi(api);
  static DecodeMatMulOp decode_matmul;
  try {
    Ort::CustomOpDomain domain{"com.ulsexport"};
    domain.Add(&decode_matmul);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> hold(domains_lock);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// for a benchmark outside onnxruntime: the GEMV on its own (rows <= kGemvRows, K % 8 == 0); 0 or a CUDA error
int ulsexport_decode_gemv(const void* x, const void* w, void* y, int rows, int features, int k, int gated,
                          void* stream) {
  if (rows < 1 || rows > kGemvRows || k % kKMultiple != 0) return -1;
  (gated ? launch_gemv<true> : launch_gemv<false>)(static_cast<const half*>(x), static_cast<const half*>(w),
                                                    static_cast<half*>(y), rows, features, k,
                                                    static_cast<cudaStream_t>(stream));
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
