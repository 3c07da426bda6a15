// Weight-only 4- and 8-bit matrix products for the few rows of a decoding step or a draft tree.
//
// Weights come in blocks of 16 outputs x 32 inputs (one group of each output), laid out by
// quant.py as the rows of an AMX/VNNI bf16 "B" operand: row r holds, for each of the 16 outputs,
// the inputs 2r and 2r+1. Each block is read and turned into bf16 integers once per call (exact:
// |q| <= 128 fits bf16's 8-bit significand) and applied to every row: by one AMX tile product
// (16 rows at a time), by AVX-512 bf16 dot products, or by plain C++. The dot product of a row
// with q is exact in each product and rounded only in float32 sums; the group's scale and minimum
// are applied after, in float32: y = sum_g scale_g * (x_g . q_g) + min_g * sum(x_g).
//
// With a given kernel every row goes through the same instructions in the same order whatever the
// number of rows in the call; kAuto picks one kernel per CPU, not per call.

#include "qmatmul.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

namespace qmatmul {
namespace {

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kGroup = 32;  // inputs per group (a GGUF Q4/Q8 block)
constexpr int64_t kBlock = 16;  // outputs per block: one AMX tile row of float32
constexpr int64_t kTileRows = 16;
constexpr int64_t kBRows = kGroup / 2;  // bf16 pairs per output in a group

struct Problem {
  const uint16_t* x;  // bf16 bits, rows x k
  int64_t rows, k, n, groups, bits;
  const uint8_t* packed;
  const float* scales;
  const float* mins;   // nullptr: no minimum (8 bits)
  const float* xsum;   // rows x groups: each row's sum over each group (for the minimum)
  const float* bias;   // n floats or nullptr
  uint16_t* y;         // bf16 bits, rows x n

  int64_t block_bytes() const { return kBlock * kGroup * bits / 8; }
  const uint8_t* block(int64_t nb, int64_t g) const { return packed + (nb * groups + g) * block_bytes(); }
  int64_t param(int64_t nb, int64_t g) const { return (nb * groups + g) * kBlock; }
};

uint16_t bf16_bits(float v) {  // exact for the small integers it is used on
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return static_cast<uint16_t>(u >> 16);
}

float bf16_value(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// ---- turning a block into bf16 integers (AVX-512) -------------------------------------------
// A 4-bit plane is 256 bytes: 64 bytes hold 4 B rows, row 4c+j in nibble j of each 16-bit word of
// chunk c (quant.py packs so). An 8-bit block is two such planes, q = 16 * high + low with a signed
// high nibble: both planes multiply the same inputs into the same float32 tile, the high one
// through a table that holds 16 * its value (exact in bf16).
// vpermw reads 5 index bits: the tables repeat their 16 entries twice so the next nibble's bit is ignored.
struct Tables {
  __m512i low, high;
};

AVX512_TARGET Tables nibble_tables() {
  alignas(64) uint16_t low[32], high[32];
  for (int i = 0; i < 32; ++i) {
    const int nibble = i & 15;
    low[i] = bf16_bits(static_cast<float>(nibble));
    high[i] = bf16_bits(16.0f * static_cast<float>(nibble < 8 ? nibble : nibble - 16));
  }
  return {_mm512_load_si512(low), _mm512_load_si512(high)};
}

AVX512_TARGET inline void unpack_plane(const uint8_t* src, uint16_t* dst, __m512i table) {
  for (int c = 0; c < 4; ++c) {
    const __m512i z = _mm512_loadu_si512(src + 64 * c);
    _mm512_store_si512(dst + 32 * (4 * c + 0), _mm512_permutexvar_epi16(z, table));
    _mm512_store_si512(dst + 32 * (4 * c + 1), _mm512_permutexvar_epi16(_mm512_srli_epi16(z, 4), table));
    _mm512_store_si512(dst + 32 * (4 * c + 2), _mm512_permutexvar_epi16(_mm512_srli_epi16(z, 8), table));
    _mm512_store_si512(dst + 32 * (4 * c + 3), _mm512_permutexvar_epi16(_mm512_srli_epi16(z, 12), table));
  }
}

constexpr int64_t kPlaneBytes = kBRows * 32 / 2;  // 256
constexpr int64_t kPlaneElems = kBRows * 32;      // 512 bf16

// The block's planes as bf16 B rows: dst[0..512) (4 bits: the weights; 8 bits: the high part),
// dst[512..1024) (8 bits: the low part).
AVX512_TARGET inline void unpack_block(const Problem& p, int64_t nb, int64_t g, uint16_t* dst, const Tables& t) {
  const uint8_t* src = p.block(nb, g);
  if (p.bits == 4) {
    unpack_plane(src, dst, t.low);
  } else {
    unpack_plane(src, dst, t.high);
    unpack_plane(src + kPlaneBytes, dst + kPlaneElems, t.low);
  }
}

// Rows' accumulators (16 floats each) += scale * dot + min * xsum, for one block and group.
AVX512_TARGET inline void accumulate(const Problem& p, int64_t nb, int64_t g, int64_t first, int64_t count,
                                     const float* dots, float* acc) {
  const __m512 scale = _mm512_loadu_ps(p.scales + p.param(nb, g));
  if (p.mins) {
    const __m512 minimum = _mm512_loadu_ps(p.mins + p.param(nb, g));
    const float* xsum = p.xsum + first * p.groups + g;
    for (int64_t i = 0; i < count; ++i) {
      const __m512 a = _mm512_fmadd_ps(_mm512_loadu_ps(dots + i * kBlock), scale, _mm512_loadu_ps(acc + i * kBlock));
      _mm512_storeu_ps(acc + i * kBlock, _mm512_fmadd_ps(_mm512_set1_ps(xsum[i * p.groups]), minimum, a));
    }
  } else {
    for (int64_t i = 0; i < count; ++i)
      _mm512_storeu_ps(acc + i * kBlock,
                       _mm512_fmadd_ps(_mm512_loadu_ps(dots + i * kBlock), scale, _mm512_loadu_ps(acc + i * kBlock)));
  }
}

// Rows first..first+count of block nb from their accumulators, plus the bias, rounded to bf16.
AVX512_TARGET void write_block(const Problem& p, int64_t nb, int64_t first, int64_t count, const float* acc) {
  const int64_t width = std::min(kBlock, p.n - nb * kBlock);
  const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + nb * kBlock) : _mm512_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(acc + i * kBlock), bias));
    _mm256_mask_storeu_epi16(p.y + (first + i) * p.n + nb * kBlock, mask, (__m256i)out);
  }
}

// A call streams its weights from beyond the core's own cache: without being asked ahead, the
// memory system keeps too few lines in flight, and one row ran at half speed on a model's weights
// (against the same weight called repeatedly, from cache).
inline void prefetch_ahead(const Problem& p, int64_t nb, int64_t g) {
  constexpr int64_t kAhead = 8;  // block-groups, as blocks and their parameters lie in memory
  const int64_t bytes = p.block_bytes(), index = nb * p.groups + g + kAhead;
  const char* block = reinterpret_cast<const char*>(p.packed + index * bytes);
  for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(block + line, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p.scales + index * kBlock), _MM_HINT_T0);
  if (p.mins) _mm_prefetch(reinterpret_cast<const char*>(p.mins + index * kBlock), _MM_HINT_T0);
}

// ---- AMX: up to 16 rows x 16 outputs x 32 inputs per tile product ---------------------------
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {  // Linux hands out the tile state only on request, once per process
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  static const bool permitted = syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  return permitted;
}

// Tiles 0, 1: C of two neighbouring blocks; 2: A (the rows' inputs of a group); 3, 4: their B.
__attribute__((target("amx-tile"))) void configure_tiles(int64_t rows) {
  TileConfig config;
  auto set = [&](int tile, int64_t r) { config.rows[tile] = static_cast<uint8_t>(r), config.colsb[tile] = 64; };
  set(0, rows), set(1, rows), set(2, rows), set(3, kBRows), set(4, kBRows);
  _tile_loadconfig(&config);
}

// Rows first..first+count (count <= 16) against blocks begin..end, two blocks per step so that one
// block's tile products overlap the next block's unpacking.
AMX_TARGET void amx_rows(const Problem& p, int64_t first, int64_t count, int64_t begin, int64_t end, float* acc) {
  configure_tiles(count);
  const Tables tables = nibble_tables();
  alignas(64) uint16_t b0[2 * kPlaneElems], b1[2 * kPlaneElems];
  alignas(64) float c0[kTileRows * kBlock], c1[kTileRows * kBlock];
  float* acc1 = acc + count * kBlock;
  const uint16_t* x = p.x + first * p.k;
  const int64_t stride = p.k * 2;
  const bool eight = p.bits == 8;
  for (int64_t nb = begin; nb < end; nb += 2) {
    const bool pair = nb + 1 < end;
    std::fill(acc, acc + 2 * count * kBlock, 0.0f);
    for (int64_t g = 0; g < p.groups; ++g) {
      prefetch_ahead(p, nb, g);
      if (pair) prefetch_ahead(p, nb + 1, g);
      _tile_loadd(2, x + g * kGroup, stride);
      unpack_block(p, nb, g, b0, tables);
      _tile_zero(0);
      _tile_loadd(3, b0, 64);
      _tile_dpbf16ps(0, 2, 3);
      if (eight) {
        _tile_loadd(3, b0 + kPlaneElems, 64);
        _tile_dpbf16ps(0, 2, 3);
      }
      if (pair) {
        unpack_block(p, nb + 1, g, b1, tables);
        _tile_zero(1);
        _tile_loadd(4, b1, 64);
        _tile_dpbf16ps(1, 2, 4);
        if (eight) {
          _tile_loadd(4, b1 + kPlaneElems, 64);
          _tile_dpbf16ps(1, 2, 4);
        }
      }
      _tile_stored(0, c0, 64);
      accumulate(p, nb, g, first, count, c0, acc);
      if (pair) {
        _tile_stored(1, c1, 64);
        accumulate(p, nb + 1, g, first, count, c1, acc1);
      }
    }
    write_block(p, nb, first, count, acc);
    if (pair) write_block(p, nb + 1, first, count, acc1);
  }
}

AMX_TARGET void amx_blocks(const Problem& p, int64_t begin, int64_t end) {
  std::vector<float> acc(2 * kTileRows * kBlock);
  for (int64_t first = 0; first < p.rows; first += kTileRows)
    amx_rows(p, first, std::min(kTileRows, p.rows - first), begin, end, acc.data());
  _tile_release();
}

// ---- AVX-512 bf16 dot products: one row at a time ----------------------------------------------
// x . q for one row and one plane: four named chains so that the products' latencies overlap
// (an indexed array of accumulators would live in memory).
// acc += row r of B (32 bf16: 16 outputs x 2 inputs) times inputs 2r and 2r+1.
AVX512_TARGET inline __m512 dot_step(__m512 acc, const uint16_t* xg, __m512i b_row, int r) {
  uint32_t bits;
  std::memcpy(&bits, xg + 2 * r, sizeof bits);
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(bits)), (__m512bh)b_row);
}

AVX512_TARGET inline __m512 dot_plane(const uint16_t* xg, const uint16_t* b) {
  __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps(), p2 = _mm512_setzero_ps(), p3 = _mm512_setzero_ps();
  for (int r = 0; r < kBRows; r += 4) {
    p0 = dot_step(p0, xg, _mm512_load_si512(b + 32 * r), r);
    p1 = dot_step(p1, xg, _mm512_load_si512(b + 32 * (r + 1)), r + 1);
    p2 = dot_step(p2, xg, _mm512_load_si512(b + 32 * (r + 2)), r + 2);
    p3 = dot_step(p3, xg, _mm512_load_si512(b + 32 * (r + 3)), r + 3);
  }
  return _mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3));
}

// One row: the same products in the same order as dot_plane and accumulate, but each unpacked
// chunk goes straight from vpermw into the dot products and the accumulator stays in a register
// (no store and reload of 16 B rows per plane, which bound the one-row speed).
AVX512_TARGET inline __m512 dot_plane_packed(const uint16_t* xg, const uint8_t* src, __m512i table) {
  __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps(), p2 = _mm512_setzero_ps(), p3 = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    const __m512i z = _mm512_loadu_si512(src + 64 * c);
    p0 = dot_step(p0, xg, _mm512_permutexvar_epi16(z, table), 4 * c);
    p1 = dot_step(p1, xg, _mm512_permutexvar_epi16(_mm512_srli_epi16(z, 4), table), 4 * c + 1);
    p2 = dot_step(p2, xg, _mm512_permutexvar_epi16(_mm512_srli_epi16(z, 8), table), 4 * c + 2);
    p3 = dot_step(p3, xg, _mm512_permutexvar_epi16(_mm512_srli_epi16(z, 12), table), 4 * c + 3);
  }
  return _mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3));
}

AVX512_TARGET void avx512_one_row(const Problem& p, int64_t begin, int64_t end) {
  const Tables t = nibble_tables();
  for (int64_t nb = begin; nb < end; ++nb) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint16_t* xg = p.x + g * kGroup;
      const uint8_t* src = p.block(nb, g);
      prefetch_ahead(p, nb, g);
      __m512 dot = dot_plane_packed(xg, src, p.bits == 4 ? t.low : t.high);
      if (p.bits == 8) dot = _mm512_add_ps(dot, dot_plane_packed(xg, src + kPlaneBytes, t.low));
      acc = _mm512_fmadd_ps(dot, _mm512_loadu_ps(p.scales + p.param(nb, g)), acc);
      if (p.mins) acc = _mm512_fmadd_ps(_mm512_set1_ps(p.xsum[g]), _mm512_loadu_ps(p.mins + p.param(nb, g)), acc);
    }
    write_block(p, nb, 0, 1, reinterpret_cast<const float*>(&acc));
  }
}

AVX512_TARGET void avx512_blocks(const Problem& p, int64_t begin, int64_t end) {
  if (p.rows == 1) return avx512_one_row(p, begin, end);
  const Tables tables = nibble_tables();
  alignas(64) uint16_t b[2 * kPlaneElems];
  std::vector<float> accumulators(p.rows * kBlock), dots(p.rows * kBlock);
  float* acc = accumulators.data();
  for (int64_t nb = begin; nb < end; ++nb) {
    std::fill(acc, acc + p.rows * kBlock, 0.0f);
    for (int64_t g = 0; g < p.groups; ++g) {
      unpack_block(p, nb, g, b, tables);
      for (int64_t m = 0; m < p.rows; ++m) {
        const uint16_t* xg = p.x + m * p.k + g * kGroup;
        __m512 dot = dot_plane(xg, b);
        if (p.bits == 8) dot = _mm512_add_ps(dot, dot_plane(xg, b + kPlaneElems));
        _mm512_storeu_ps(dots.data() + m * kBlock, dot);
      }
      accumulate(p, nb, g, 0, p.rows, dots.data(), acc);
    }
    write_block(p, nb, 0, p.rows, acc);
  }
}

// ---- plain C++: any CPU ------------------------------------------------------------------------
// The weight of output j (0..15), input i (0..31) of a block, as an integer.
int nibble_at(const uint8_t* plane, int j, int i) {
  const int r = i / 2, word = 2 * j + i % 2;
  uint16_t bits;
  std::memcpy(&bits, plane + 64 * (r / 4) + 2 * word, sizeof bits);
  return (bits >> (4 * (r % 4))) & 15;
}

int weight_at(const Problem& p, const uint8_t* block, int j, int i) {
  if (p.bits == 4) return nibble_at(block, j, i);
  const int high = nibble_at(block, j, i);
  return 16 * (high < 8 ? high : high - 16) + nibble_at(block + kPlaneBytes, j, i);
}

__attribute__((target_clones("avx2", "default"))) void generic_blocks(const Problem& p, int64_t begin, int64_t end) {
  std::vector<float> acc(p.rows * kBlock), q(kBlock * kGroup);
  for (int64_t nb = begin; nb < end; ++nb) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint8_t* block = p.block(nb, g);
      for (int j = 0; j < kBlock; ++j)
        for (int i = 0; i < kGroup; ++i) q[j * kGroup + i] = static_cast<float>(weight_at(p, block, j, i));
      const float* scale = p.scales + p.param(nb, g);
      const float* min = p.mins ? p.mins + p.param(nb, g) : nullptr;
      for (int64_t m = 0; m < p.rows; ++m) {
        const uint16_t* xg = p.x + m * p.k + g * kGroup;
        for (int j = 0; j < kBlock; ++j) {
          float dot = 0.0f;
          for (int i = 0; i < kGroup; ++i) dot += bf16_value(xg[i]) * q[j * kGroup + i];
          float& a = acc[m * kBlock + j];
          a = std::fma(dot, scale[j], a);
          if (min) a = std::fma(p.xsum[m * p.groups + g], min[j], a);
        }
      }
    }
    const int64_t width = std::min(kBlock, p.n - nb * kBlock);
    for (int64_t m = 0; m < p.rows; ++m)
      for (int64_t j = 0; j < width; ++j) {
        const float v = acc[m * kBlock + j] + (p.bias ? p.bias[nb * kBlock + j] : 0.0f);
        p.y[m * p.n + nb * kBlock + j] = c10::BFloat16(v).x;
      }
  }
}

bool cpu_has_avx512_bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

bool cpu_has_amx() { return cpu_has_avx512_bf16() && __builtin_cpu_supports("amx-bf16") && amx_permitted(); }

// kAuto: AMX tiles wherever the CPU has them, for one row too. Alone, one row goes faster by
// AVX-512 dot products (8 against 14 us on a 576x576 weight), but within a model's step it did
// not (SmolLM2 Q4_1 12.4 ms either way) or went far slower (Qwen2.5-Coder's 8-bit weights: 50
// against 37 ms); and one kernel for every row count gives a row the same bits in a one-token
// step as in a tree, so verification agrees exactly with plain decoding of the same weights.
int64_t resolve(int64_t kernel) {
  if (kernel != kAuto) return kernel;
  if (cpu_has_amx()) return kAmx;
  return cpu_has_avx512_bf16() ? kAvx512 : kGeneric;
}

}  // namespace

std::vector<int64_t> available_kernels() {
  std::vector<int64_t> kernels;
  if (cpu_has_amx()) kernels.push_back(kAmx);
  if (cpu_has_avx512_bf16()) kernels.push_back(kAvx512);
  kernels.push_back(kGeneric);
  return kernels;
}

std::string kernel_name(int64_t kernel) {
  switch (resolve(kernel)) {
    case kAmx: return "amx-bf16";
    case kAvx512: return "avx512-bf16";
    default: return "generic";
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins,
                  int64_t n, int64_t bits, const std::optional<at::Tensor>& bias, int64_t kernel) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "qmatmul: x must be 2-D bfloat16");
  TORCH_CHECK(bits == 4 || bits == 8, "qmatmul: 4 or 8 bits");
  const int64_t k = x.size(1), groups = k / kGroup, blocks = (n + kBlock - 1) / kBlock;
  TORCH_CHECK(k % kGroup == 0 && packed.numel() == blocks * groups * kBlock * kGroup * bits / 8 &&
                  scales.numel() == blocks * groups * kBlock && packed.is_contiguous() && scales.is_contiguous(),
              "qmatmul: weights do not match the input size");
  TORCH_CHECK(bits == 8 || (mins.numel() == scales.numel() && mins.is_contiguous()), "qmatmul: 4 bits need minimums");
  kernel = resolve(kernel);
  TORCH_CHECK(kernel == kGeneric || (kernel == kAvx512 ? cpu_has_avx512_bf16() : cpu_has_amx()),
              "qmatmul: this CPU cannot run kernel ", kernel);  // (cpu_has_amx also asks Linux for the tiles)
  const auto xc = x.contiguous();
  auto y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const auto* xbits = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  std::vector<float> xsum(bits == 4 ? x.size(0) * groups : 0);
  for (size_t i = 0; i < xsum.size(); ++i) {  // in input order, the same for every row
    float sum = 0.0f;
    for (int64_t j = 0; j < kGroup; ++j) sum += bf16_value(xbits[i * kGroup + j]);
    xsum[i] = sum;
  }
  const Problem p{xbits, x.size(0), k, n, groups, bits,
                  packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                  bits == 4 ? mins.data_ptr<float>() : nullptr, bits == 4 ? xsum.data() : nullptr,
                  bias.has_value() ? bias_f.data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(y.data_ptr())};
  auto run = kernel == kAmx ? amx_blocks : kernel == kAvx512 ? avx512_blocks : generic_blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) { run(p, begin, end); });
  return y;
}

}  // namespace qmatmul
