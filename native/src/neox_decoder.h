// GPT-NeoX decoder with a per-row KV cache, built on CTranslate2's own layers and ops.
//
// Compiled against CTranslate2's public headers and linked to the pip wheel's library of the same
// version (pyproject.toml pins it exactly): the layers/ops API is outside CTranslate2's
// compatibility promise, so jachat checks this decoder against stock CTranslate2 at start-up
// (jachat/service/engine/native.py) and serves with static batches when they disagree.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ctranslate2/layers/attention.h>
#include <ctranslate2/layers/transformer.h>
#include <ctranslate2/models/model.h>

namespace neox {

  using ctranslate2::DataType;
  using ctranslate2::Device;
  using ctranslate2::StorageView;
  using ctranslate2::dim_t;

  struct Row {
    int64_t id;
    dim_t length;  // tokens already in the cache for this row (= position of its next token)
  };

  // K and V of every layer for a set of rows, dense [B, H, T, D]; rows right-aligned: row b's
  // valid columns are [T - length_b, T). On the CPU the running batch's cache may hold spare
  // columns: [B, H, capacity, D], columns [T, capacity) zero, so a step writes its new column in
  // place instead of copying the whole cache into one a column wider (the copy was most of the
  // step's growth with T: 21 ms at 67 columns, 33 ms at 167, 16 rows of the bench model).
  struct Cache {
    std::vector<StorageView> keys;
    std::vector<StorageView> values;
    std::vector<Row> rows;
    dim_t time = 0;
    dim_t capacity = 0;  // 0: compact, [B, H, T, D]
    // With spare columns, rows the buffers hold: [slots, H, capacity, D], the running rows first
    // (a contiguous prefix), so a join writes its row into a free slot and a drop moves the rows
    // after it down, neither copying the whole cache.
    dim_t slots = 0;
  };

  struct Scored {
    std::vector<float> chosen;
    std::vector<int32_t> best;
    std::vector<float> best_scores;
  };

  struct LayerWeights;  // defined in the .cc

  class NeoXDecoder {
  public:
    NeoXDecoder(const std::string& model_dir,
                const std::string& device = "cpu",
                const std::string& compute_type = "default",
                int device_index = 0,
                int intra_threads = 1);
    ~NeoXDecoder();

    // Prefills the prompt but its last token for one row alone and joins it to the running batch;
    // its last prompt token is its input at the next step, whose logits give its first token. As
    // stock CTranslate2 runs a prompt (one causal pass, then its last token as a step), so a row
    // alone computes what stock computes.
    void join(int64_t row_id, const std::vector<int32_t>& prompt_ids);

    // Prefills the next part of a row's prompt (`ids` after the parts before) into a cache of its
    // own, outside the running batch: a long prompt is prefilled a chunk between two steps, and
    // `join` with the whole prompt then prefills what is left but its last token and joins the row.
    // Each chunk attends to the parts before it, at its own positions, so the row's cache is the one
    // a single prefill gives (within float rounding).
    void extend(int64_t row_id, const std::vector<int32_t>& ids);

    // Tokens of a row's prompt prefilled by `extend` so far (0 when it has none pending).
    dim_t pending(int64_t row_id) const;

    // One decode step for every running row. tokens[i] is the token of rows()[i].
    // Returns float32 logits [num_rows, vocab] (row-major), in rows() order.
    std::vector<float> step(const std::vector<int32_t>& tokens);

    // Teacher-forced scores of a whole sequence, alone and without touching the running rows: for
    // each position i < L - 1, the log-probability of ids[i + 1] after ids[0..i], and the most
    // likely token there with its log-probability (log-softmax on the device, in float32).
    Scored score(const std::vector<int32_t>& ids);

    // Removes every row, whatever state a failed call left the cache in.
    void reset();

    // Removes rows and trims cache columns that no remaining row needs. The rows left may change
    // order (a row from the end fills a dropped row's slot): rows() gives the order.
    void drop(const std::vector<int64_t>& row_ids);

    const std::vector<Row>& rows() const { return _batch.rows; }
    dim_t cache_columns() const { return _batch.time; }
    dim_t vocab_size() const { return _vocab_size; }
    dim_t num_layers() const { return static_cast<dim_t>(_layers.size()); }
    dim_t num_heads() const { return _num_heads; }
    dim_t head_dim() const { return _d_head; }
    dim_t hidden_size() const { return _d_model; }
    dim_t rotary_dim() const { return _rotary_dim; }
    bool parallel_residual() const { return _parallel_residual; }
    std::string compute_type() const;
    std::string device() const;
    int intra_threads() const { return _intra_threads; }

  private:
    void prepare_thread() const;
    void embed(const StorageView& ids, StorageView& out) const;
    Cache empty_cache() const;
    void check_ids(const std::vector<int32_t>& ids) const;
    StorageView prefill(const std::vector<int32_t>& ids, Cache& cache);
    StorageView forward_step(Cache& cache, const std::vector<int32_t>& tokens);
    void merge(Cache& row);
    void compact(Cache& cache) const;
    void widen(Cache& cache, dim_t capacity) const;
    StorageView running_view(StorageView& buffer, const Cache& cache) const;
    dim_t position_bytes() const;
    void write_row(Cache& row);
    void drop_in_place(const std::vector<int32_t>& keep);
    StorageView left_padded(StorageView kv, dim_t rows, dim_t time, dim_t columns) const;
    void check_new_row(int64_t row_id, const std::vector<int32_t>& prompt_ids) const;
    void layer_forward(const LayerWeights& l, size_t index, const StorageView& x, StorageView& out,
                       const StorageView* prefill_mask, const StorageView* step_bias,
                       const StorageView* step_sin, const StorageView* step_cos, Cache& cache);
    void self_attention(const LayerWeights& l, size_t index, const StorageView& x, StorageView& out,
                        const StorageView* prefill_mask, const StorageView* step_bias,
                        const StorageView* step_sin, const StorageView* step_cos, Cache& cache);
    void ensure_rotary_table(dim_t num_positions);
    std::vector<float> logits_to_host(StorageView& logits) const;
    StorageView zeros(const ctranslate2::Shape& shape) const;

    std::shared_ptr<const ctranslate2::models::Model> _model;
    Device _device;
    int _device_index;
    int _intra_threads;
    DataType _dtype;

    std::unique_ptr<ctranslate2::layers::Embeddings> _embeddings;
    std::unique_ptr<StorageView> _embeddings_scale;
    std::vector<std::unique_ptr<LayerWeights>> _layers;
    std::unique_ptr<ctranslate2::layers::LayerNorm> _output_norm;
    std::unique_ptr<ctranslate2::layers::Dense> _projection;

    dim_t _num_heads = 0;
    dim_t _d_model = 0;
    dim_t _d_head = 0;
    dim_t _vocab_size = 0;
    float _queries_scale = 1;
    bool _parallel_residual = false;

    // Rotary: a stock RotaryEmbeddings (used as is for the causal prefill, offset 0) and the
    // sin/cos tables read back from it (used with each row's own position in a step).
    dim_t _rotary_dim = 0;  // as stored (0 = whole head)
    dim_t _rotary_table_dim = 0;
    bool _rotary_interleave = false;
    std::unique_ptr<ctranslate2::layers::RotaryEmbeddings> _rotary;
    std::unique_ptr<ctranslate2::ops::Rotary> _rotary_op;
    StorageView _sin_table;
    StorageView _cos_table;
    dim_t _table_positions = 0;
    // Arguments of the stock RotaryEmbeddings, kept to rebuild a larger table.
    struct RotaryArgs {
      ctranslate2::layers::RotaryScalingType scaling_type;
      float scaling_factor;
      float base;
      const StorageView* long_factor;
      const StorageView* short_factor;
      float low_freq_factor;
      float high_freq_factor;
      dim_t original_max_position_embeddings;
      dim_t max_position_embeddings;
    } _rotary_args;

    Cache _batch;  // the running rows
    std::map<int64_t, Cache> _pending;  // rows whose prompt is being prefilled in chunks (extend)
  };

}
