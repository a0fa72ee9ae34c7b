// Depthwise convolution on the CPU as XLA FFI handlers, for NHWC float32 maps,
// and the per-channel sum of squares that GRN takes over each map.
//
// XLA's CPU backend runs a grouped convolution slowly, and the shifted sum
// that `layers.depthwise_conv` writes in JAX reads the padded input once per
// tap through index arithmetic. These loops keep a block of channels of one
// output pixel in vector registers while all taps are summed into it.
//
// Both handlers take odd square kernels with "SAME" padding (k // 2 on every
// side), which is what the encoder (7x7) and the SegFormer head (3x3) use.
// The input gradient is the forward pass with the kernel turned by 180
// degrees, so it needs no handler of its own.
//
// Taps that fall outside the map are skipped rather than multiplied by zero,
// so a NaN or inf tap near the border leaves those outputs finite, where
// lax.conv gives NaN.
//
// Work is split over output rows between std::threads. The caller compiles
// this file with -march=native, so the channel loops become AVX-512 or AVX2.

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Channels summed together in registers: 64 float32 are four AVX-512 vectors.
constexpr int64_t kChannelBlock = 64;

struct Shape {
  int64_t batch, rows, columns, channels, kernel;
};

// The cores this process may run on (its affinity mask under Linux, which
// taskset and many container runtimes set), else the machine's.
int64_t AvailableCores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

// The number of threads for `count` items, at least `min_per_thread` each.
int64_t ThreadCount(int64_t count, int64_t min_per_thread) {
  return std::min(AvailableCores(), std::max<int64_t>(1, count / min_per_thread));
}

// Run body(first, last) over [0, count) split into contiguous parts, one per
// thread. The calling thread takes the first part.
template <typename Body>
void ParallelFor(int64_t count, int64_t min_per_thread, Body body) {
  const int64_t threads = ThreadCount(count, min_per_thread);
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    workers.emplace_back(body, count * t / threads, count * (t + 1) / threads);
  }
  body(0, count / threads);
  for (auto& worker : workers) worker.join();
}

// Fill out[0, size) with the sum of what body(first, last, partial) adds into
// a zeroed partial array per part of [0, count). The parts are added in a
// fixed order, so the result does not depend on how threads were scheduled.
template <typename Body>
void ParallelSum(int64_t count, int64_t min_per_thread, int64_t size, float* out, Body body) {
  const int64_t threads = ThreadCount(count, min_per_thread);
  std::vector<std::vector<float>> partial(threads, std::vector<float>(size, 0.0f));
  ParallelFor(threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      body(count * t / threads, count * (t + 1) / threads, partial[t].data());
    }
  });
  std::copy(partial[0].begin(), partial[0].end(), out);
  for (int64_t t = 1; t < threads; ++t) {
    for (int64_t e = 0; e < size; ++e) out[e] += partial[t][e];
  }
}

// y[n, h, w, c] = sum over taps (i, j) of x[n, h + i - p, w + j - p, c] * k[i, j, c],
// with zeros outside x, for output rows [first, last) of all images and
// channels [c0, c0 + width). kFull: width is kChannelBlock, known to the compiler.
template <bool kFull>
void ForwardRows(const float* x, const float* k, float* y, const Shape& s,
                 int64_t first, int64_t last, int64_t c0, int64_t width) {
  if constexpr (kFull) width = kChannelBlock;
  const int64_t p = s.kernel / 2;
  const int64_t row_stride = s.columns * s.channels;
  float acc[kChannelBlock];
  for (int64_t index = first; index < last; ++index) {
    const int64_t n = index / s.rows, h = index % s.rows;
    const float* image = x + n * s.rows * row_stride;
    float* out = y + index * row_stride;
    const int64_t i_first = std::max<int64_t>(0, p - h);
    const int64_t i_last = std::min<int64_t>(s.kernel, s.rows + p - h);
    for (int64_t w = 0; w < s.columns; ++w) {
      const int64_t j_first = std::max<int64_t>(0, p - w);
      const int64_t j_last = std::min<int64_t>(s.kernel, s.columns + p - w);
      for (int64_t c = 0; c < width; ++c) acc[c] = 0.0f;
      for (int64_t i = i_first; i < i_last; ++i) {
        const float* in_row = image + (h + i - p) * row_stride + c0;
        const float* k_row = k + i * s.kernel * s.channels + c0;
        for (int64_t j = j_first; j < j_last; ++j) {
          const float* in = in_row + (w + j - p) * s.channels;
          const float* tap = k_row + j * s.channels;
          for (int64_t c = 0; c < width; ++c) acc[c] += in[c] * tap[c];
        }
      }
      float* o = out + w * s.channels + c0;
      for (int64_t c = 0; c < width; ++c) o[c] = acc[c];
    }
  }
}

void Forward(const float* x, const float* k, float* y, const Shape& s) {
  ParallelFor(s.batch * s.rows, 4, [&](int64_t first, int64_t last) {
    for (int64_t c0 = 0; c0 < s.channels; c0 += kChannelBlock) {
      const int64_t width = std::min(kChannelBlock, s.channels - c0);
      if (width == kChannelBlock) {
        ForwardRows<true>(x, k, y, s, first, last, c0, width);
      } else {
        ForwardRows<false>(x, k, y, s, first, last, c0, width);
      }
    }
  });
}

// dk[i, j, c] += sum over output rows [first, last) and columns of
// x[n, h + i - p, w + j - p, c] * g[n, h, w, c], for channels [c0, c0 + width).
void KernelGradientRows(const float* x, const float* g, float* dk, const Shape& s,
                        int64_t first, int64_t last, int64_t c0, int64_t width) {
  const int64_t p = s.kernel / 2;
  const int64_t row_stride = s.columns * s.channels;
  float acc[kChannelBlock];
  for (int64_t index = first; index < last; ++index) {
    const int64_t n = index / s.rows, h = index % s.rows;
    const float* image = x + n * s.rows * row_stride;
    const float* grad_row = g + index * row_stride + c0;
    const int64_t i_first = std::max<int64_t>(0, p - h);
    const int64_t i_last = std::min<int64_t>(s.kernel, s.rows + p - h);
    for (int64_t i = i_first; i < i_last; ++i) {
      const float* in_row = image + (h + i - p) * row_stride + c0;
      for (int64_t j = 0; j < s.kernel; ++j) {
        // Output columns w whose input column w + j - p lies inside the map.
        const int64_t w_first = std::max<int64_t>(0, p - j);
        const int64_t w_last = std::min<int64_t>(s.columns, s.columns + p - j);
        for (int64_t c = 0; c < width; ++c) acc[c] = 0.0f;
        for (int64_t w = w_first; w < w_last; ++w) {
          const float* in = in_row + (w + j - p) * s.channels;
          const float* grad = grad_row + w * s.channels;
          if (width == kChannelBlock) {
            for (int64_t c = 0; c < kChannelBlock; ++c) acc[c] += in[c] * grad[c];
          } else {
            for (int64_t c = 0; c < width; ++c) acc[c] += in[c] * grad[c];
          }
        }
        float* out = dk + (i * s.kernel + j) * s.channels + c0;
        for (int64_t c = 0; c < width; ++c) out[c] += acc[c];
      }
    }
  }
}

void KernelGradient(const float* x, const float* g, float* dk, const Shape& s) {
  const int64_t taps = s.kernel * s.kernel * s.channels;
  ParallelSum(s.batch * s.rows, 4, taps, dk, [&](int64_t first, int64_t last, float* partial) {
    for (int64_t c0 = 0; c0 < s.channels; c0 += kChannelBlock) {
      const int64_t width = std::min(kChannelBlock, s.channels - c0);
      KernelGradientRows(x, g, partial, s, first, last, c0, width);
    }
  });
}

// sums[n, c] = sum over h and w of x[n, h, w, c]^2. Each thread sums a range
// of positions of every image.
void SpatialSumOfSquares(const float* x, float* sums, int64_t batch, int64_t positions,
                         int64_t channels) {
  ParallelSum(positions, 64, batch * channels, sums,
              [&](int64_t first, int64_t last, float* partial) {
                for (int64_t n = 0; n < batch; ++n) {
                  float* out = partial + n * channels;
                  const float* image = x + n * positions * channels;
                  for (int64_t position = first; position < last; ++position) {
                    const float* pixel = image + position * channels;
                    for (int64_t c = 0; c < channels; ++c) out[c] += pixel[c] * pixel[c];
                  }
                }
              });
}

ffi::Error CheckShapes(ffi::Span<const int64_t> map, ffi::Span<const int64_t> kernel) {
  if (map.size() != 4 || kernel.size() != 3) {
    return ffi::Error::InvalidArgument("expected an NHWC map and a (k, k, C) kernel");
  }
  if (kernel[0] != kernel[1] || kernel[0] % 2 != 1 || kernel[2] != map[3]) {
    return ffi::Error::InvalidArgument(
        "expected an odd square kernel with one tap vector per channel of the map");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto dims = x.dimensions();
  if (auto error = CheckShapes(dims, kernel.dimensions()); error.failure()) return error;
  const Shape shape{dims[0], dims[1], dims[2], dims[3], kernel.dimensions()[0]};
  Forward(x.typed_data(), kernel.typed_data(), y->typed_data(), shape);
  return ffi::Error::Success();
}

ffi::Error KernelGradientImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> grad,
                              ffi::ResultBuffer<ffi::F32> grad_kernel) {
  auto dims = x.dimensions();
  if (auto error = CheckShapes(dims, grad_kernel->dimensions()); error.failure()) return error;
  const Shape shape{dims[0], dims[1], dims[2], dims[3], grad_kernel->dimensions()[0]};
  KernelGradient(x.typed_data(), grad.typed_data(), grad_kernel->typed_data(), shape);
  return ffi::Error::Success();
}

ffi::Error SpatialSumOfSquaresImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> sums) {
  auto dims = x.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("expected an NHWC map");
  SpatialSumOfSquares(x.typed_data(), sums->typed_data(), dims[0], dims[1] * dims[2], dims[3]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UemIchSpatialSumOfSquares, SpatialSumOfSquaresImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UemIchDepthwiseForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UemIchDepthwiseKernelGradient, KernelGradientImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
