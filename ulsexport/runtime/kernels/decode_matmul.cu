// onnxruntime custom-op library: com.ulsexport DecodeMatMul on the CUDA provider.
//
// DecodeMatMul(X [..., K] fp16, Wt [N, K] fp16) -> Y [..., N] = X @ Wt^T, the weight transposed ("nk").
// With at most kMaxRows rows in X (a decode step's batch) it runs one kernel made for that shape: a
// block per 16 output features streams their weight rows once, each warp a share of K, the products
// on the tensor cores (mma m16n8k16, fp32 accumulation, as cuBLAS accumulates), X's rows as the
// instruction's 8 columns. Above that (a prompt) it calls cuBLAS, which is then compute bound.
//
// The weight rows are read with 16-byte loads, 64 contiguous bytes per row per warp step; the mma's
// k order is permuted consistently for both operands (any order of a sum over k gives the product),
// so that each lane's 16 bytes of weight and of X are exactly its fragments of two k16 steps.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

namespace {

constexpr int kMaxRows = 8;        // X rows one mma column block holds
constexpr int kFeaturesPerBlock = 16;
constexpr int kWarps = 8;          // per block, splitting K
constexpr int kUnroll = 4;         // k32 steps each warp has in flight
constexpr int kStep = 32;          // k per warp step: 4 lanes x 8 halves
constexpr size_t kCublasWorkspace = 32u << 20;

__device__ __forceinline__ uint4 load_once(const half* p) {  // weights: read once, not kept in L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void mma_m16n8k16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Y[m, n] = sum_k X[m, k] Wt[n, k] for m < rows <= 8; K % 32 == 0, N % 16 == 0.
// Lane (g, t) = (lane / 4, lane % 4) holds features g and g + 8 of its block and X row g.
__global__ void __launch_bounds__(kWarps * 32) decode_matmul_kernel(const half* __restrict__ x,
                                                                    const half* __restrict__ w,
                                                                    half* __restrict__ y, int rows, int n, int k) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int feature = blockIdx.x * kFeaturesPerBlock + g;
  const half* w_lo = w + static_cast<size_t>(feature) * k + 8 * t;
  const half* w_hi = w_lo + static_cast<size_t>(8) * k;
  const bool has_row = g < rows;
  const half* x_row = x + static_cast<size_t>(has_row ? g : 0) * k + 8 * t;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  const int steps = k / kStep;
  for (int first = warp; first < steps; first += kWarps * kUnroll) {
    uint4 lo[kUnroll], hi[kUnroll], xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = first + u * kWarps;
      const bool in = s < steps;
      lo[u] = in ? load_once(w_lo + kStep * s) : zero;
      hi[u] = in ? load_once(w_hi + kStep * s) : zero;
      xv[u] = in && has_row ? __ldg(reinterpret_cast<const uint4*>(x_row + kStep * s)) : zero;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      mma_m16n8k16(c, lo[u].x, hi[u].x, lo[u].y, hi[u].y, xv[u].x, xv[u].y);
      mma_m16n8k16(c, lo[u].z, hi[u].z, lo[u].w, hi[u].w, xv[u].z, xv[u].w);
    }
  }
  __shared__ float partial[kWarps][32][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][lane][i] = c[i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float sum = 0.f;
#pragma unroll
    for (int other = 0; other < kWarps; ++other) sum += partial[other][lane][i];
    c[i] = sum;
  }
  // c0, c1: feature g, rows 2t and 2t + 1; c2, c3: feature g + 8, the same rows
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = 2 * t + (i & 1);
    if (row < rows) y[static_cast<size_t>(row) * n + feature + (i >> 1) * 8] = __float2half_rn(c[i]);
  }
}

std::string cuda_error(cudaError_t status, const char* what) {
  return std::string("ulsexport DecodeMatMul: ") + what + ": " + cudaGetErrorString(status);
}

// one cuBLAS handle per thread and device, with a workspace of its own (so that capture allocates nothing)
cublasHandle_t cublas_for(int device) {
  struct Handle {
    cublasHandle_t handle = nullptr;
    void* workspace = nullptr;
  };
  static thread_local std::vector<Handle> handles;
  if (static_cast<int>(handles.size()) <= device) handles.resize(device + 1);
  Handle& h = handles[device];
  if (h.handle == nullptr) {
    if (cublasCreate(&h.handle) != CUBLAS_STATUS_SUCCESS) throw Ort::Exception("cublasCreate failed", ORT_FAIL);
    cudaError_t status = cudaMalloc(&h.workspace, kCublasWorkspace);
    if (status != cudaSuccess) throw Ort::Exception(cuda_error(status, "cuBLAS workspace"), ORT_FAIL);
    cublasSetWorkspace(h.handle, h.workspace, kCublasWorkspace);
  }
  return h.handle;
}

struct DecodeMatMulKernel {
  DecodeMatMulKernel(const OrtApi&, const OrtKernelInfo*) {}

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
    if (x_shape.empty() || w_shape.size() != 2 || w_shape[1] != x_shape.back())
      throw Ort::Exception("ulsexport DecodeMatMul: X [..., K] and Wt [N, K] do not match", ORT_INVALID_ARGUMENT);
    const int64_t k = x_shape.back(), n = w_shape[0];
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < x_shape.size(); ++i) rows *= x_shape[i];
    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = n;
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    if (rows == 0) return;
    auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    auto x_data = reinterpret_cast<const half*>(x.GetTensorRawData());
    auto w_data = reinterpret_cast<const half*>(w.GetTensorRawData());
    auto y_data = reinterpret_cast<half*>(y.GetTensorMutableRawData());
    if (rows <= kMaxRows && k % kStep == 0 && n % kFeaturesPerBlock == 0) {
      decode_matmul_kernel<<<static_cast<unsigned>(n / kFeaturesPerBlock), kWarps * 32, 0, stream>>>(
          x_data, w_data, y_data, static_cast<int>(rows), static_cast<int>(n), static_cast<int>(k));
      cudaError_t status = cudaGetLastError();
      if (status != cudaSuccess) throw Ort::Exception(cuda_error(status, "launch"), ORT_FAIL);
      return;
    }
    int device = 0;
    cudaGetDevice(&device);
    cublasHandle_t handle = cublas_for(device);
    cublasSetStream(handle, stream);
    const float one = 1.f, zero = 0.f;
    // column-major: Y^T [N, rows] = Wt [K, N]^T X^T [K, rows]
    cublasStatus_t status = cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(rows),
                                         static_cast<int>(k), &one, w_data, CUDA_R_16F, static_cast<int>(k), x_data,
                                         CUDA_R_16F, static_cast<int>(k), &zero, y_data, CUDA_R_16F,
                                         static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (status != CUBLAS_STATUS_SUCCESS)
      throw Ort::Exception("ulsexport DecodeMatMul: cublasGemmEx failed (" + std::to_string(status) + ")", ORT_FAIL);
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
  if (api == nullptr) return nullptr;  // an onnxruntime older than these headers: the graph's ops stay unknown
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
  }
  return nullptr;
}

// for a benchmark outside onnxruntime: the decode kernel on its own (rows <= 8, K % 32 == 0, N % 16 == 0)
int ulsexport_decode_matmul(const void* x, const void* w, void* y, int rows, int n, int k, void* stream) {
  if (rows < 1 || rows > kMaxRows || k % kStep != 0 || n % kFeaturesPerBlock != 0) return -1;
  decode_matmul_kernel<<<static_cast<unsigned>(n / kFeaturesPerBlock), kWarps * 32, 0,
                         static_cast<cudaStream_t>(stream)>>>(static_cast<const half*>(x), static_cast<const half*>(w),
                                                              static_cast<half*>(y), rows, n, k);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
