#include "neox_decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <unordered_set>
#include <utility>

#include <ctranslate2/devices.h>
#include <ctranslate2/ops/ops.h>
#include <ctranslate2/types.h>
#include <ctranslate2/utils.h>

namespace neox {

  namespace ct2 = ctranslate2;

  // Spare columns a CPU cache grows by when a step needs one more (Cache): a whole-cache copy every
  // this many steps instead of every step, for at most this many masked columns' reads per step.
  constexpr dim_t SPARE_COLUMNS = 32;
  using ct2::layers::Dense;
  using ct2::layers::LayerNorm;
  using ct2::layers::build_optional_layer;

  static const std::string kScope = "decoder";

  struct LayerWeights {
    LayerWeights(const ct2::models::Model& model,
                 const std::string& scope,
                 bool pre_norm,
                 ct2::ops::ActivationType activation)
      : attn_layer_norm(build_optional_layer<LayerNorm>(model, scope + "/self_attention/layer_norm"))
      , qkv(model, scope + "/self_attention/linear_0")
      , out(model, scope + "/self_attention/linear_1", nullptr, /*is_layer_out=*/true)
      , shared_layer_norm(build_optional_layer<LayerNorm>(model, scope + "/shared_layer_norm"))
      , input_layer_norm(build_optional_layer<LayerNorm>(model, scope + "/input_layer_norm"))
      , post_attention_layer_norm(build_optional_layer<LayerNorm>(model, scope + "/post_attention_layer_norm"))
      , ffn(model, scope + "/ffn", pre_norm, activation) {
    }

    const std::unique_ptr<const LayerNorm> attn_layer_norm;  // pre-norm inside attention (sequential residual)
    const Dense qkv;   // fused [q; k; v], output 3 * d_model
    const Dense out;   // output projection
    const std::unique_ptr<const LayerNorm> shared_layer_norm;
    const std::unique_ptr<const LayerNorm> input_layer_norm;
    const std::unique_ptr<const LayerNorm> post_attention_layer_norm;
    // Holds a pointer to its own activation type member: never moved (kept in a unique_ptr).
    const ct2::layers::FeedForwardNetwork ffn;
  };

  // Features of TransformerDecoder / MultiHeadAttention that GPT-NeoX does not use and that this
  // prototype does not implement: refuse such models instead of computing something else.
  static void check_supported(const ct2::models::Model& model, dim_t num_layers) {
    const std::vector<std::string> decoder_vars = {
      "/layernorm_embedding/gamma", "/project_in/weight", "/project_out/weight",
      "/position_encodings/encodings", "/scale_outputs",
    };
    for (const auto& v : decoder_vars)
      if (model.get_variable_if_exists(kScope + v))
        throw std::invalid_argument("unsupported decoder feature: " + kScope + v);
    if (model.get_flag_with_default(kScope + "/alibi", false))
      throw std::invalid_argument("unsupported: alibi");
    if (model.get_flag_with_default(kScope + "/start_from_zero_embedding", false))
      throw std::invalid_argument("unsupported: start_from_zero_embedding");
    if (model.get_attribute_with_default<int32_t>(kScope + "/sliding_window", 0) != 0)
      throw std::invalid_argument("unsupported: sliding_window");
    if (model.get_attribute_with_default<float>(kScope + "/final_logit_softcapping", 0.f) != 0.f)
      throw std::invalid_argument("unsupported: final_logit_softcapping");
    for (dim_t i = 0; i < num_layers; ++i) {
      const std::string s = kScope + "/layer_" + std::to_string(i);
      const std::string a = s + "/self_attention";
      if (model.layer_exists(s + "/attention"))
        throw std::invalid_argument("unsupported: cross attention");
      if (model.layer_exists(s + "/pre_feedforward_layer_norm")
          || model.layer_exists(s + "/post_feedforward_layer_norm"))
        throw std::invalid_argument("unsupported: pre/post feed-forward layer norms");
      if (model.get_flag_with_default(a + "/multi_query", false)
          || model.get_variable_if_exists(a + "/num_heads_kv"))
        throw std::invalid_argument("unsupported: multi-query / grouped-query attention");
      for (const std::string v : {"/relative_attention_bias", "/relative_position_keys",
                                  "/relative_asymmetric_position_keys", "/relative_position_values",
                                  "/q_norm/gamma", "/k_norm/gamma", "/v_norm/gamma", "/head_dim"})
        if (model.get_variable_if_exists(a + v))
          throw std::invalid_argument("unsupported attention feature: " + a + v);
      if (model.get_attribute_with_default<int32_t>(a + "/rotary_dim", -1) < 0)
        throw std::invalid_argument("unsupported: attention without rotary embeddings");
      if (model.layer_exists(s + "/ffn/linear_0_noact"))
        ;  // gated FFN: handled by FeedForwardNetwork itself
      if (model.get_attribute_with_default<float>(s + "/layer_scalar", 1.f) != 1.f)
        throw std::invalid_argument("unsupported: layer_scalar");
    }
  }

  NeoXDecoder::NeoXDecoder(const std::string& model_dir,
                           const std::string& device,
                           const std::string& compute_type,
                           int device_index,
                           int intra_threads)
    : _device(ct2::str_to_device(device))
    , _device_index(device_index)
    , _intra_threads(intra_threads) {
    prepare_thread();
    _model = ct2::models::Model::load(model_dir,
                                      _device,
                                      device_index,
                                      ct2::str_to_compute_type(compute_type));
    const auto& model = *_model;
    const auto scoped_device_setter = model.get_scoped_device_setter();

    if (!model.get_variable_if_exists(kScope + "/embeddings/weight"))
      throw std::invalid_argument("not a decoder-only CTranslate2 model: " + model_dir);

    dim_t num_layers = 0;
    while (model.layer_exists(kScope + "/layer_" + std::to_string(num_layers)))
      ++num_layers;
    if (num_layers == 0)
      throw std::invalid_argument("model has no decoder layers");
    check_supported(model, num_layers);

    _num_heads = model.get_attribute_with_default<int32_t>(kScope + "/num_heads", 8);
    const bool pre_norm = model.get_flag_with_default(kScope + "/pre_norm", true);
    const auto activation = model.get_enum_value<ct2::ops::ActivationType>(kScope + "/activation");

    _embeddings = std::make_unique<ct2::layers::Embeddings>(model, kScope + "/embeddings");
    for (dim_t i = 0; i < num_layers; ++i)
      _layers.emplace_back(std::make_unique<LayerWeights>(
        model, kScope + "/layer_" + std::to_string(i), pre_norm, activation));
    _output_norm = build_optional_layer<LayerNorm>(model, kScope + "/layer_norm");
    _projection = std::make_unique<Dense>(model, kScope + "/projection");
    _dtype = _projection->output_type();
    _vocab_size = _projection->output_size();

    // Same rule as TransformerDecoder (build_embeddings_scale in src/layers/transformer.cc).
    {
      const auto* scale = model.get_variable_if_exists(kScope + "/scale_embeddings");
      if (!scale)
        scale = model.get_variable_if_exists(kScope + "/embeddings/multiply_by_sqrt_depth");
      StorageView value;
      bool use = true;
      if (!scale || (scale->dtype() == DataType::INT8 && scale->as_scalar<int8_t>()))
        value = StorageView(std::sqrt(static_cast<float>(_embeddings->output_size())));
      else if (scale->dtype() != DataType::INT8 && scale->as_scalar<float>() != 1.f)
        value = *scale;
      else
        use = false;
      if (use)
        _embeddings_scale = std::make_unique<StorageView>(value.to(_embeddings->output_type()));
    }

    const LayerWeights& first = *_layers.front();
    _parallel_residual = bool(first.shared_layer_norm) || bool(first.input_layer_norm);
    _d_model = first.out.output_size();
    if (_d_model % _num_heads != 0)
      throw std::invalid_argument("hidden size is not a multiple of num_heads");
    _d_head = _d_model / _num_heads;
    if (first.qkv.output_size() != 3 * _d_model)
      throw std::invalid_argument("unexpected fused QKV size");

    // Attention attributes, read as AttentionLayer / make_rotary_embeddings read them
    // (src/layers/attention_layer.cc). They must be equal in every layer.
    const std::string a0 = kScope + "/layer_0/self_attention";
    _queries_scale = model.get_attribute_with_default<float>(
      a0 + "/queries_scale", 1.f / std::sqrt(static_cast<float>(_d_head)));
    _rotary_dim = model.get_attribute_with_default<int32_t>(a0 + "/rotary_dim", -1);
    _rotary_interleave = model.get_flag_with_default(a0 + "/rotary_interleave", true);
    _rotary_args.base = model.get_attribute_with_default<float>(a0 + "/rotary_base", 10000.f);
    _rotary_args.scaling_type = model.get_enum_value<ct2::layers::RotaryScalingType>(
      a0 + "/rotary_scaling_type", -1);
    _rotary_args.scaling_factor = model.get_attribute_with_default<float>(
      a0 + "/rotary_scaling_factor", 1.f);
    _rotary_args.long_factor = model.get_variable_if_exists(a0 + "/rotary_scaling_long_factor");
    _rotary_args.short_factor = model.get_variable_if_exists(a0 + "/rotary_scaling_short_factor");
    _rotary_args.original_max_position_embeddings = model.get_attribute_with_default<int32_t>(
      a0 + "/original_max_position_embeddings", 0);
    _rotary_args.max_position_embeddings = model.get_attribute_with_default<int32_t>(
      a0 + "/max_position_embeddings", 0);
    _rotary_args.high_freq_factor = model.get_attribute_with_default<float>(
      a0 + "/rotary_high_freq_factor", 4.0);
    _rotary_args.low_freq_factor = model.get_attribute_with_default<float>(
      a0 + "/rotary_low_freq_factor", 1.0);
    for (dim_t i = 1; i < num_layers; ++i) {
      const std::string a = kScope + "/layer_" + std::to_string(i) + "/self_attention";
      if (model.get_attribute_with_default<int32_t>(a + "/rotary_dim", -1) != _rotary_dim
          || model.get_flag_with_default(a + "/rotary_interleave", true) != _rotary_interleave
          || model.get_attribute_with_default<float>(a + "/rotary_base", 10000.f) != _rotary_args.base
          || model.get_variable_if_exists(a + "/rotary_scaling_type")
          || model.get_variable_if_exists(a + "/queries_scale"))
        throw std::invalid_argument("unsupported: attention attributes differ between layers");
    }
    _rotary_table_dim = _rotary_dim == 0 ? _d_head : _rotary_dim;
    if (_rotary_table_dim > _d_head || _rotary_table_dim % 2 != 0)
      throw std::invalid_argument("bad rotary_dim");
    _rotary = std::make_unique<ct2::layers::RotaryEmbeddings>(
      _rotary_dim, _rotary_interleave, _rotary_args.scaling_type, _rotary_args.scaling_factor,
      _rotary_args.base, /*num_initial_positions=*/2048, _rotary_args.long_factor,
      _rotary_args.short_factor, _rotary_args.low_freq_factor, _rotary_args.high_freq_factor,
      _rotary_args.original_max_position_embeddings, _rotary_args.max_position_embeddings,
      /*transpose=*/true);
    _rotary_op = std::make_unique<ct2::ops::Rotary>(_rotary_dim, _rotary_interleave);
    ensure_rotary_table(2048);

    _batch = empty_cache();
  }

  NeoXDecoder::~NeoXDecoder() = default;

  std::string NeoXDecoder::compute_type() const {
    return ct2::compute_type_to_str(_model->effective_compute_type());
  }

  std::string NeoXDecoder::device() const {
    return ct2::device_to_str(_device);
  }

  void NeoXDecoder::prepare_thread() const {
    // OpenMP's thread count is per calling thread: set it on whichever thread computes.
    if (_device == Device::CPU)
      ct2::set_num_threads(_intra_threads);
  }

  StorageView NeoXDecoder::zeros(const ct2::Shape& shape) const {
    StorageView z(shape, _dtype, _device);
    z.zero();
    return z;
  }

  // The stock RotaryEmbeddings keeps its sin/cos tables private. Read them back exactly by
  // rotating unit inputs with it: with x = 1 on the "first" lanes (first half, or even lanes when
  // interleaved) and 0 elsewhere, the rotary kernel writes cos on those lanes and sin on the
  // others; with the complement it writes -sin and cos. Products with 0 and 1 are exact, so the
  // tables are bit-identical to the ones stock CTranslate2 uses (same size rule, same ops).
  void NeoXDecoder::ensure_rotary_table(dim_t num_positions) {
    if (num_positions <= _table_positions)
      return;
    const dim_t n = std::max(num_positions, _table_positions + 2048);
    const dim_t dim = _rotary_table_dim;
    ct2::layers::RotaryEmbeddings rotary(
      _rotary_dim, _rotary_interleave, _rotary_args.scaling_type, _rotary_args.scaling_factor,
      _rotary_args.base, /*num_initial_positions=*/2048, _rotary_args.long_factor,
      _rotary_args.short_factor, _rotary_args.low_freq_factor, _rotary_args.high_freq_factor,
      _rotary_args.original_max_position_embeddings, _rotary_args.max_position_embeddings,
      /*transpose=*/true);

    auto is_first = [&](dim_t i) {
      return _rotary_interleave ? (i % 2 == 0) : (i < dim / 2);
    };
    std::vector<float> x1(n * dim), x2(n * dim);
    for (dim_t t = 0; t < n; ++t)
      for (dim_t i = 0; i < dim; ++i) {
        x1[t * dim + i] = is_first(i) ? 1.f : 0.f;
        x2[t * dim + i] = is_first(i) ? 0.f : 1.f;
      }
    StorageView y1 = StorageView({1, 1, n, dim}, x1).to(_device).to(_dtype);
    StorageView y2 = StorageView({1, 1, n, dim}, x2).to(_device).to(_dtype);
    rotary.apply(y1, 0);
    rotary.apply(y2, 0);
    const std::vector<float> h1 = y1.to_float32().to(Device::CPU).to_vector<float>();
    const std::vector<float> h2 = y2.to_float32().to(Device::CPU).to_vector<float>();
    std::vector<float> sin(n * dim), cos(n * dim);
    for (dim_t t = 0; t < n; ++t)
      for (dim_t i = 0; i < dim; ++i) {
        const dim_t k = t * dim + i;
        if (is_first(i)) {
          cos[k] = h1[k];
          sin[k] = -h2[k];
        } else {
          cos[k] = h2[k];
          sin[k] = h1[k];
        }
      }
    _sin_table = StorageView({n, dim}, sin).to(_device).to(_dtype);
    _cos_table = StorageView({n, dim}, cos).to(_device).to(_dtype);
    _table_positions = n;
  }

  void NeoXDecoder::embed(const StorageView& ids, StorageView& out) const {
    (*_embeddings)(ids, out);
    if (_embeddings_scale)
      ct2::ops::Mul()(out, *_embeddings_scale, out);
  }

  // Mirrors MultiHeadAttention::operator() (src/layers/attention.cc) for self-attention with a
  // fused QKV projection, no GQA, rotary embeddings. Two modes:
  //  - prefill (prefill_mask set): x is [1, L, C], one row alone, causal; its K/V [1, H, L, D]
  //    become the (empty) cache's.
  //  - step (step_bias set): x is [B, 1, C], one token per row of the cache; rotary uses each
  //    row's own position (step_sin/step_cos, [B*H, dim]); K/V of the new tokens are appended at
  //    column T; step_bias [B, H, 1, T+1] masks each row's left padding with -inf.
  void NeoXDecoder::self_attention(const LayerWeights& l, size_t index, const StorageView& x,
                                   StorageView& output, const StorageView* prefill_mask,
                                   const StorageView* step_bias, const StorageView* step_sin,
                                   const StorageView* step_cos, Cache& cache) {
    namespace ops = ct2::ops;
    static const ops::Transpose transpose_op({0, 2, 1, 3});
    const Device device = _device;
    const DataType dtype = x.dtype();
    StorageView fused(dtype, device);
    StorageView q(dtype, device);
    StorageView k(dtype, device);
    StorageView v(dtype, device);

    const StorageView* in = &x;
    StorageView normed(dtype, device);
    if (l.attn_layer_norm) {
      (*l.attn_layer_norm)(x, normed);
      in = &normed;
    }
    l.qkv(*in, fused);  // [B, T, 3C]

    const dim_t batch = fused.dim(0);
    const dim_t time = fused.dim(1);
    // split_heads(fused, 3H) then Split(1)
    if (time == 1) {
      fused.reshape({batch, 3 * _num_heads, 1, _d_head});
    } else {
      fused.reshape({batch, time, 3 * _num_heads, _d_head});
      StorageView t(dtype, device);
      transpose_op(fused, t);
      fused = std::move(t);
    }
    ops::Split(1)(fused, q, k, v);  // each [B, H, T, D]

    StorageView context(dtype, device);
    if (prefill_mask) {
      // A whole prompt (offset 0), or a chunk after `offset` cached positions (extend): its queries
      // attend to the cached keys and to its own, causally (the mask's lengths say how many).
      const dim_t offset = cache.time;
      _rotary->apply(q, offset);
      _rotary->apply(k, offset);
      if (offset > 0) {
        const ops::Concat concat_op(2);
        StorageView past(dtype, device);
        past = std::move(cache.keys[index]);
        concat_op({&past, &k}, cache.keys[index]);    // [1, H, offset + L, D]
        past = std::move(cache.values[index]);
        concat_op({&past, &v}, cache.values[index]);
      } else {
        cache.keys[index] = std::move(k);
        cache.values[index] = std::move(v);
      }
      const ops::MatMul keys_matmul(false, true, _queries_scale);
      StorageView scores(dtype, device);
      keys_matmul(q, cache.keys[index], scores);     // [1, H, L, offset + L]
      ops::SoftMax()(scores, prefill_mask, scores);
      ops::MatMul()(scores, cache.values[index], context);  // [1, H, L, D]
    } else {
      // Each row's own position: view [B, H, 1, D] as [1, B*H, D] ("time" = row*head).
      const ct2::Shape shape = q.shape();
      StorageView y(dtype, device);
      q.reshape({1, batch * _num_heads, _d_head});
      (*_rotary_op)(q, *step_sin, *step_cos, y, /*is_transposed=*/true);
      q = std::move(y);
      q.reshape(shape);
      k.reshape({1, batch * _num_heads, _d_head});
      (*_rotary_op)(k, *step_sin, *step_cos, y, /*is_transposed=*/true);
      k = std::move(y);
      k.reshape(shape);

      StorageView& keys = cache.keys[index];
      StorageView& values = cache.values[index];
      if (cache.time == 0) {  // a one-token prompt: nothing cached yet (as stock starts)
        keys = std::move(k);
        values = std::move(v);
      } else if (cache.capacity > 0) {  // spare columns (CPU): the new one is written in place
        const dim_t rows = batch * _num_heads;
        const dim_t bytes = position_bytes();
        for (auto [cached, fresh] : {std::pair{&keys, &k}, std::pair{&values, &v}}) {
          auto* dst = static_cast<char*>(cached->buffer());
          const auto* src = static_cast<const char*>(fresh->buffer());
          for (dim_t r = 0; r < rows; ++r)
            std::memcpy(dst + (r * cache.capacity + cache.time) * bytes, src + r * bytes, bytes);
        }
      } else {
        const ops::Concat concat_op(2);
        StorageView tmp(dtype, device);
        tmp = std::move(keys);
        concat_op({&tmp, &k}, keys);             // [B, H, T+1, D]
        tmp = std::move(values);
        concat_op({&tmp, &v}, values);
      }

      const ops::MatMul keys_matmul(false, true, _queries_scale);
      StorageView scores(dtype, device);
      const bool spare = cache.capacity > 0;  // the running rows' prefix of the buffers
      StorageView keys_view = spare ? running_view(keys, cache) : StorageView(dtype, device);
      StorageView values_view = spare ? running_view(values, cache) : StorageView(dtype, device);
      keys_matmul(q, spare ? keys_view : keys, scores);              // [B, H, 1, T+1 or capacity]
      ops::Add()(scores, *step_bias, scores);
      ops::SoftMax()(scores, nullptr, scores);
      ops::MatMul()(scores, spare ? values_view : values, context);  // [B, H, 1, D]
    }

    // combine_heads
    const dim_t ctime = context.dim(2);
    if (ctime > 1) {
      StorageView t(dtype, device);
      transpose_op(context, t);
      context = std::move(t);
    }
    context.reshape({batch, ctime, _d_model});
    l.out(context, output, l.attn_layer_norm ? &x : nullptr);
  }

  // Mirrors TransformerDecoderLayer::operator() (src/layers/transformer.cc) for the two layouts
  // GPT-NeoX converts to: parallel residual (use_parallel_residual=true: input_layer_norm +
  // post_attention_layer_norm, out = ffn(ln2(x)) + x + attn(ln1(x))) and sequential
  // (use_parallel_residual=false: the attention and the FFN each pre-normalize and add their own
  // residual).
  void NeoXDecoder::layer_forward(const LayerWeights& l, size_t index, const StorageView& x,
                                  StorageView& output, const StorageView* prefill_mask,
                                  const StorageView* step_bias, const StorageView* step_sin,
                                  const StorageView* step_cos, Cache& cache) {
    const DataType dtype = x.dtype();
    if (_parallel_residual) {
      StorageView hidden(dtype, _device);
      if (l.shared_layer_norm)
        (*l.shared_layer_norm)(x, hidden);
      else
        (*l.input_layer_norm)(x, hidden);
      StorageView attn(dtype, _device);
      self_attention(l, index, hidden, attn, prefill_mask, step_bias, step_sin, step_cos, cache);
      if (l.post_attention_layer_norm)
        (*l.post_attention_layer_norm)(x, hidden);
      l.ffn(hidden, output);
      ct2::ops::Add()(output, x, output);
      ct2::ops::Add()(output, attn, output);
    } else {
      StorageView attn(dtype, _device);
      self_attention(l, index, x, attn, prefill_mask, step_bias, step_sin, step_cos, cache);
      l.ffn(attn, output);
    }
  }

  std::vector<float> NeoXDecoder::logits_to_host(StorageView& logits) const {
    StorageView host = logits.dtype() == DataType::FLOAT32 ? logits : logits.to_float32();
    if (host.device() != Device::CPU)
      host = host.to(Device::CPU);
    ct2::synchronize_stream(_device);
    const float* data = host.data<float>();
    return std::vector<float>(data, data + host.size());
  }

  Cache NeoXDecoder::empty_cache() const {
    Cache cache;
    for (size_t i = 0; i < _layers.size(); ++i) {
      cache.keys.emplace_back(_dtype, _device);
      cache.values.emplace_back(_dtype, _device);
    }
    return cache;
  }

  void NeoXDecoder::check_ids(const std::vector<int32_t>& ids) const {
    for (const int32_t id : ids)
      if (id < 0 || id >= _vocab_size)
        throw std::invalid_argument("token id out of range: " + std::to_string(id));
  }

  // One causal forward pass of `ids` for a row alone, into an empty cache; returns the last
  // layer's output [1, L, C] (add needs none of it: the last prompt token is a step).
  StorageView NeoXDecoder::prefill(const std::vector<int32_t>& ids, Cache& cache) {
    const dim_t length = ids.size();
    StorageView input = StorageView({1, length}, ids).to(_device);
    StorageView layer_in(_dtype, _device);
    StorageView layer_out(_dtype, _device);
    embed(input, layer_in);

    const dim_t offset = cache.time;  // positions already cached (a chunk after earlier ones)
    StorageView mask(DataType::INT32, _device);
    if (offset == 0) {
      // Causal mask exactly as TransformerDecoder::decode builds it for a single row.
      StorageView lengths = StorageView({1}, std::vector<int32_t>{int32_t(length)}).to(_device);
      mask = ct2::layers::MultiHeadAttention::prepare_length_mask(
        lengths, _num_heads, length, /*mask_future=*/true, /*multi_query=*/false);
    } else {
      // The same layout, [1, H, L]: query q of the chunk sees the offset cached keys and q + 1 of its own.
      std::vector<int32_t> seen(_num_heads * length);
      for (dim_t h = 0; h < _num_heads; ++h)
        for (dim_t q = 0; q < length; ++q)
          seen[h * length + q] = static_cast<int32_t>(offset + q + 1);
      mask = StorageView({1, _num_heads, length}, seen).to(_device);
    }
    for (size_t i = 0; i < _layers.size(); ++i) {
      layer_forward(*_layers[i], i, layer_in, layer_out, &mask, nullptr, nullptr, nullptr, cache);
      layer_in = std::move(layer_out);
    }
    cache.time = offset + length;
    cache.rows.front().length = offset + length;
    return layer_in;
  }

  // One token per row of `cache`, each at its own position; returns logits [B, 1, V] on the device.
  StorageView NeoXDecoder::forward_step(Cache& cache, const std::vector<int32_t>& tokens) {
    const dim_t batch = cache.rows.size();
    dim_t max_position = 0;
    for (const auto& r : cache.rows)
      max_position = std::max(max_position, r.length);
    ensure_rotary_table(max_position + 1);

    // Per-row positions, one index per (row, head).
    std::vector<int32_t> positions(batch * _num_heads);
    for (dim_t b = 0; b < batch; ++b)
      for (dim_t h = 0; h < _num_heads; ++h)
        positions[b * _num_heads + h] = cache.rows[b].length;
    const StorageView pos = StorageView({batch * _num_heads}, positions).to(_device);
    StorageView sin(_dtype, _device), cos(_dtype, _device);
    ct2::ops::Gather()(_sin_table, pos, sin);  // [B*H, dim]
    ct2::ops::Gather()(_cos_table, pos, cos);

    // On the CPU, columns to spare so that the step appends in place (Cache); elsewhere the
    // cache grows by a concatenation (no device kernel of ours writes a column in place).
    if (_device == Device::CPU && cache.time > 0 && cache.capacity < cache.time + 1)
      widen(cache, cache.time + 1 + SPARE_COLUMNS);

    // Additive mask over the cache after this step's append: T+1 columns (or the capacity), -inf
    // on each row's left padding and on the spare columns past the new one (exp(-inf) is exactly
    // 0, and spare columns are zero, so neither changes any sum).
    const dim_t cols = cache.capacity > 0 ? cache.capacity : cache.time + 1;
    std::vector<float> bias(batch * _num_heads * cols, 0.f);
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (dim_t b = 0; b < batch; ++b) {
      const dim_t first_valid = cache.time - cache.rows[b].length;
      for (dim_t h = 0; h < _num_heads; ++h) {
        float* row = bias.data() + (b * _num_heads + h) * cols;
        std::fill(row, row + first_valid, neg_inf);
        std::fill(row + cache.time + 1, row + cols, neg_inf);
      }
    }
    StorageView step_bias = StorageView({batch, _num_heads, 1, cols}, bias).to(_device);
    if (_dtype != DataType::FLOAT32)
      step_bias = step_bias.to(_dtype);

    StorageView ids = StorageView({batch}, tokens).to(_device);
    StorageView layer_in(_dtype, _device);
    StorageView layer_out(_dtype, _device);
    embed(ids, layer_in);           // [B, C]
    layer_in.expand_dims(1);        // [B, 1, C]
    for (size_t i = 0; i < _layers.size(); ++i) {
      layer_forward(*_layers[i], i, layer_in, layer_out, nullptr, &step_bias, &sin, &cos, cache);
      layer_in = std::move(layer_out);
    }
    if (_output_norm)
      (*_output_norm)(layer_in, layer_in);
    StorageView logits(_dtype, _device);
    (*_projection)(layer_in, logits);  // [B, 1, V]

    cache.time += 1;
    for (auto& r : cache.rows)
      r.length += 1;
    return logits;
  }

  // The cache without its spare columns, [B, H, T, D], as joins and drops reshape it.
  void NeoXDecoder::compact(Cache& cache) const {
    if (cache.capacity == 0)
      return;
    // Every layer's copy first, then the swap: a failure midway (memory) leaves the cache as it
    // was, never some layers compact under a capacity that says otherwise (the in-place writes
    // would run past their buffers).
    const ct2::ops::Slide used(2, 0, cache.time);
    std::vector<StorageView> keys, values;
    for (size_t i = 0; i < cache.keys.size(); ++i) {
      keys.emplace_back(_dtype, _device);
      used(running_view(cache.keys[i], cache), keys.back());
      values.emplace_back(_dtype, _device);
      used(running_view(cache.values[i], cache), values.back());
    }
    cache.keys = std::move(keys);
    cache.values = std::move(values);
    cache.capacity = 0;
    cache.slots = 0;
  }

  // Bytes of one position of one head in the cache: [D] of the compute type.
  dim_t NeoXDecoder::position_bytes() const {
    return _d_head * StorageView(_dtype, _device).item_size();
  }

  // The running rows of a buffer with spare columns: its first rows, [B, H, capacity, D].
  StorageView NeoXDecoder::running_view(StorageView& buffer, const Cache& cache) const {
    StorageView view(_dtype, _device);
    view.view(buffer.buffer(), {dim_t(cache.rows.size()), _num_heads, cache.capacity, _d_head});
    return view;
  }

  // A row (compact, [1, H, L, D], L <= T) into the next free slot of a batch with spare columns,
  // right-aligned at T; the slots grow when none is free. The CPU's memory: plain copies.
  void NeoXDecoder::write_row(Cache& row) {
    const dim_t batch = _batch.rows.size();
    const dim_t length = row.time;
    const dim_t time = _batch.time;
    const dim_t cap = _batch.capacity;
    const dim_t bytes = position_bytes();
    const dim_t slot = _num_heads * cap * bytes;  // one row's [H, capacity, D]
    // (the slots stay at the most rows seen: a quarter more, so at most that much memory unused)
    const dim_t grown_slots = batch + std::max<dim_t>(2, batch / 4);
    for (size_t i = 0; i < _layers.size(); ++i) {
      for (auto [cached, fresh] : {std::pair{&_batch.keys[i], &row.keys[i]},
                                   std::pair{&_batch.values[i], &row.values[i]}}) {
        if (_batch.slots <= batch) {  // full: a quarter more slots, the running rows copied over
          StorageView grown = zeros({grown_slots, _num_heads, cap, _d_head});
          std::memcpy(grown.buffer(), cached->buffer(), batch * slot);
          *cached = std::move(grown);
        }
        char* free_slot = static_cast<char*>(cached->buffer()) + batch * slot;
        std::memset(free_slot, 0, slot);  // left padding and spare columns: zero
        if (length > 0) {
          const auto* src = static_cast<const char*>(fresh->buffer());
          for (dim_t h = 0; h < _num_heads; ++h)
            std::memcpy(free_slot + (h * cap + time - length) * bytes, src + h * length * bytes,
                        length * bytes);
        }
      }
    }
    if (_batch.slots <= batch)
      _batch.slots = grown_slots;
    _batch.rows.push_back(row.rows.front());
  }

  // The rows `keep` (ascending indices) take the first slots; the columns stay. A kept row past
  // them moves into a dropped row's slot (one slot copied per dropped row, not every row after
  // it: 20 ms a drop that way), so the batch order changes: rows() says it.
  void NeoXDecoder::drop_in_place(const std::vector<int32_t>& keep) {
    const dim_t kept = keep.size();
    std::vector<bool> stays(_batch.rows.size(), false);
    for (const int32_t k : keep)
      stays[k] = true;
    std::vector<dim_t> holes, movers;
    for (dim_t i = 0; i < kept; ++i)
      if (!stays[i])
        holes.push_back(i);
    for (dim_t j = kept; j < dim_t(stays.size()); ++j)
      if (stays[j])
        movers.push_back(j);
    const dim_t slot = _num_heads * _batch.capacity * position_bytes();  // one row's [H, capacity, D]
    for (size_t i = 0; i < _layers.size(); ++i) {
      for (StorageView* kv : {&_batch.keys[i], &_batch.values[i]}) {
        char* base = static_cast<char*>(kv->buffer());
        for (size_t n = 0; n < holes.size(); ++n)
          std::memcpy(base + holes[n] * slot, base + movers[n] * slot, slot);
      }
    }
    for (size_t n = 0; n < holes.size(); ++n)
      _batch.rows[holes[n]] = _batch.rows[movers[n]];
    _batch.rows.resize(kept);
  }

  // The cache with zero columns up to `capacity` (columns [T, capacity) of a widened one are
  // zero already: steps write only at T).
  void NeoXDecoder::widen(Cache& cache, dim_t capacity) const {
    const dim_t batch = cache.capacity > 0 ? cache.slots : dim_t(cache.rows.size());
    const dim_t have = cache.capacity > 0 ? cache.capacity : cache.time;
    StorageView spare = zeros({batch, _num_heads, capacity - have, _d_head});
    for (size_t i = 0; i < cache.keys.size(); ++i) {
      for (StorageView* kv : {&cache.keys[i], &cache.values[i]}) {
        StorageView tmp(_dtype, _device);
        ct2::ops::Concat(2)({kv, &spare}, tmp);
        *kv = std::move(tmp);
      }
    }
    cache.capacity = capacity;
    cache.slots = batch;
  }

  // Joins a one-row cache to the running batch: whichever is shorter is left-padded with zeros
  // (an empty cache, a one-token prompt's, is all padding).
  void NeoXDecoder::merge(Cache& row) {
    const dim_t length = row.time;
    if (_batch.capacity > 0 && length <= _batch.time) {  // spare columns, and it fits left of T
      write_row(row);
      return;
    }
    compact(_batch);
    const dim_t batch = _batch.rows.size();
    if (batch == 0) {
      _batch = std::move(row);
      return;
    }
    const dim_t time = std::max(_batch.time, length);
    if (time > 0) {
      for (size_t i = 0; i < _layers.size(); ++i) {
        StorageView* row_kv[2] = {&row.keys[i], &row.values[i]};
        StorageView* batch_kv[2] = {&_batch.keys[i], &_batch.values[i]};
        for (int j = 0; j < 2; ++j) {
          StorageView& r = *row_kv[j];
          StorageView& b = *batch_kv[j];
          r = left_padded(std::move(r), 1, length, time);
          b = left_padded(std::move(b), batch, _batch.time, time);
          StorageView tmp(_dtype, _device);
          ct2::ops::Concat(0)({&b, &r}, tmp);
          b = std::move(tmp);
        }
      }
    }
    _batch.time = time;
    _batch.rows.push_back(row.rows.front());
  }

  // K or V of `rows` rows and `time` columns, left-padded with zeros to `columns`.
  StorageView NeoXDecoder::left_padded(StorageView kv, dim_t rows, dim_t time, dim_t columns) const {
    if (time == columns)
      return kv;
    StorageView pad = zeros({rows, _num_heads, columns - time, _d_head});
    if (time == 0)
      return pad;
    StorageView out(_dtype, _device);
    ct2::ops::Concat(2)({&pad, &kv}, out);
    return out;
  }

  void NeoXDecoder::check_new_row(int64_t row_id, const std::vector<int32_t>& prompt_ids) const {
    for (const auto& r : _batch.rows)
      if (r.id == row_id)
        throw std::invalid_argument("row " + std::to_string(row_id) + " is already running");
    if (prompt_ids.empty())
      throw std::invalid_argument("empty prompt");
    check_ids(prompt_ids);
  }

  void NeoXDecoder::join(int64_t row_id, const std::vector<int32_t>& prompt_ids) {
    check_new_row(row_id, prompt_ids);
    prepare_thread();
    const auto scoped_device_setter = _model->get_scoped_device_setter();
    Cache row = empty_cache();
    row.rows.push_back(Row{row_id, 0});
    const auto found = _pending.find(row_id);
    if (found != _pending.end()) {
      row = std::move(found->second);
      _pending.erase(found);
    }
    const dim_t done = row.time;
    const dim_t wanted = static_cast<dim_t>(prompt_ids.size()) - 1;  // all but the last token
    if (done > wanted)
      throw std::invalid_argument("row " + std::to_string(row_id) + " has more prefilled than its prompt");
    if (wanted > done)
      prefill(std::vector<int32_t>(prompt_ids.begin() + done, prompt_ids.end() - 1), row);
    merge(row);
  }

  void NeoXDecoder::extend(int64_t row_id, const std::vector<int32_t>& ids) {
    check_new_row(row_id, ids);
    prepare_thread();
    const auto scoped_device_setter = _model->get_scoped_device_setter();
    auto found = _pending.find(row_id);
    if (found == _pending.end()) {
      Cache row = empty_cache();
      row.rows.push_back(Row{row_id, 0});
      found = _pending.emplace(row_id, std::move(row)).first;
    }
    try {
      prefill(ids, found->second);
    } catch (...) {
      _pending.erase(found);  // half a chunk's layers: the row starts over, or fails, with nothing cached
      throw;
    }
  }

  dim_t NeoXDecoder::pending(int64_t row_id) const {
    const auto found = _pending.find(row_id);
    return found == _pending.end() ? 0 : found->second.time;
  }

  std::vector<float> NeoXDecoder::step(const std::vector<int32_t>& tokens) {
    const dim_t batch = _batch.rows.size();
    if (batch == 0)
      throw std::invalid_argument("no running rows");
    if (static_cast<dim_t>(tokens.size()) != batch)
      throw std::invalid_argument("step needs one token per running row");
    check_ids(tokens);

    prepare_thread();
    const auto scoped_device_setter = _model->get_scoped_device_setter();
    StorageView logits = forward_step(_batch, tokens);
    return logits_to_host(logits);
  }

  Scored NeoXDecoder::score(const std::vector<int32_t>& ids) {
    if (ids.size() < 2)
      throw std::invalid_argument("scoring needs at least two tokens");
    check_ids(ids);
    prepare_thread();
    const auto scoped_device_setter = _model->get_scoped_device_setter();
    Cache cache = empty_cache();
    cache.rows.push_back(Row{-1, 0});
    StorageView hidden = prefill(std::vector<int32_t>(ids.begin(), ids.end() - 1), cache);
    cache = Cache();  // the K/V are not needed: free them before the logits
    if (_output_norm)
      (*_output_norm)(hidden, hidden);
    StorageView logits(_dtype, _device);
    (*_projection)(hidden, logits);  // [1, L - 1, V]
    hidden = StorageView();
    const dim_t positions = ids.size() - 1;
    StorageView log_probs = logits.dtype() == DataType::FLOAT32 ? std::move(logits) : logits.to_float32();
    logits = StorageView();
    log_probs.reshape({positions, _vocab_size});
    ct2::ops::LogSoftMax()(log_probs);
    StorageView best_scores(DataType::FLOAT32, _device), best(DataType::INT32, _device);
    ct2::ops::TopK(1)(log_probs, best_scores, best);
    std::vector<int32_t> flat(positions);
    for (dim_t i = 0; i < positions; ++i)
      flat[i] = static_cast<int32_t>(i * _vocab_size + ids[i + 1]);
    log_probs.reshape({positions * _vocab_size});
    StorageView chosen(DataType::FLOAT32, _device);
    ct2::ops::Gather()(log_probs, StorageView({positions}, flat).to(_device), chosen);
    ct2::synchronize_stream(_device);
    Scored out;
    out.chosen = chosen.to(Device::CPU).to_vector<float>();
    out.best = best.to(Device::CPU).to_vector<int32_t>();
    out.best_scores = best_scores.to(Device::CPU).to_vector<float>();
    return out;
  }

  void NeoXDecoder::reset() {
    _batch = empty_cache();
    _pending.clear();
  }

  void NeoXDecoder::drop(const std::vector<int64_t>& row_ids) {
    const std::unordered_set<int64_t> to_drop(row_ids.begin(), row_ids.end());
    for (const int64_t id : row_ids)
      _pending.erase(id);
    std::vector<int32_t> keep;
    std::vector<Row> kept_rows;
    for (size_t i = 0; i < _batch.rows.size(); ++i) {
      if (to_drop.count(_batch.rows[i].id) == 0) {
        keep.push_back(static_cast<int32_t>(i));
        kept_rows.push_back(_batch.rows[i]);
      }
    }
    if (kept_rows.size() == _batch.rows.size())
      return;

    prepare_thread();
    const auto scoped_device_setter = _model->get_scoped_device_setter();
    dim_t new_time = 0;
    for (const auto& r : kept_rows)
      new_time = std::max(new_time, r.length);
    if (_batch.capacity > 0 && new_time == _batch.time) {  // no column goes: rows fill the holes
      drop_in_place(keep);
      return;
    }
    compact(_batch);  // columns go: the trim below works on [B, H, T, D]
    if (new_time == 0) {  // no row left, or only rows that joined with one token and hold no column yet
      _batch = empty_cache();
      _batch.rows = std::move(kept_rows);
      return;
    }

    const StorageView index = StorageView({dim_t(keep.size())}, keep).to(_device);
    const ct2::ops::Gather gather_op;
    const ct2::ops::Slide trim_op(2, _batch.time - new_time, new_time);
    for (size_t i = 0; i < _layers.size(); ++i) {
      for (StorageView* kv : {&_batch.keys[i], &_batch.values[i]}) {
        gather_op(*kv, index);
        if (new_time < _batch.time) {
          StorageView tmp(_dtype, _device);
          trim_op(*kv, tmp);
          *kv = std::move(tmp);
        }
      }
    }
    _batch.rows = std::move(kept_rows);
    _batch.time = new_time;
  }

}
