// Python bindings (nanobind) for neox::NeoXDecoder: jachat.service.engine._native.
// Locking rule: the mutex is only ever waited on with the GIL released, and released before the
// GIL is taken back (declaration order: gil_scoped_release, then lock_guard), so no deadlock.
#include <mutex>
#include <unordered_map>
#include <utility>
#include <stdexcept>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "neox_decoder.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

  using Array2 = nb::ndarray<nb::numpy, float, nb::ndim<2>>;

  // Moves a std::vector into a numpy array without copying.
  template <typename Array>
  Array to_numpy(std::vector<float>&& values, std::initializer_list<size_t> shape) {
    auto* heap = new std::vector<float>(std::move(values));
    nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    return Array(heap->data(), shape, owner);
  }

  std::vector<int32_t> to_ids(const nb::handle& seq) {
    std::vector<int32_t> ids;
    for (nb::handle item : seq)
      ids.push_back(nb::cast<int32_t>(item));
    return ids;
  }

  class Decoder {
  public:
    Decoder(const std::string& model_dir, const std::string& device,
            const std::string& compute_type, int device_index, int intra_threads) {
      nb::gil_scoped_release release;
      _impl = std::make_unique<neox::NeoXDecoder>(model_dir, device, compute_type,
                                                  device_index, intra_threads);
    }

    void join(int64_t row_id, nb::handle prompt_ids) {
      std::vector<int32_t> ids = to_ids(prompt_ids);
      nb::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(_mutex);
      _impl->join(row_id, ids);
    }

    void extend(int64_t row_id, nb::handle ids_handle) {
      std::vector<int32_t> ids = to_ids(ids_handle);
      nb::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(_mutex);
      _impl->extend(row_id, ids);
    }

    int64_t pending(int64_t row_id) {
      std::lock_guard<std::mutex> lock(_mutex);
      return _impl->pending(row_id);
    }

    // tokens: {row_id: token_id} with exactly the running rows. Returns {row_id: logits}.
    nb::dict step(nb::dict tokens) {
      std::vector<std::pair<int64_t, int32_t>> given;
      for (auto [key, value] : tokens)
        given.emplace_back(nb::cast<int64_t>(key), nb::cast<int32_t>(value));
      std::vector<int64_t> order;
      std::vector<float> logits;
      size_t vocab = 0;
      {
        nb::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(_mutex);
        const auto& rows = _impl->rows();
        if (given.size() != rows.size())
          throw std::invalid_argument("step needs a token for each of the "
                                      + std::to_string(rows.size()) + " running rows, got "
                                      + std::to_string(given.size()));
        std::unordered_map<int64_t, int32_t> by_row(given.begin(), given.end());
        std::vector<int32_t> ids;
        for (const auto& r : rows) {
          auto it = by_row.find(r.id);
          if (it == by_row.end())
            throw std::invalid_argument("no token for running row " + std::to_string(r.id));
          order.push_back(r.id);
          ids.push_back(it->second);
        }
        vocab = _impl->vocab_size();
        logits = _impl->step(ids);
      }
      const size_t batch = order.size();
      nb::object array = nb::cast(to_numpy<Array2>(std::move(logits), {batch, vocab}));
      nb::dict out;
      for (size_t i = 0; i < batch; ++i)
        out[nb::int_(order[i])] = array[nb::int_(i)];
      return out;
    }

    // Same step, array form: tokens in rows() order; returns [num_rows, vocab].
    Array2 step_array(nb::handle tokens) {
      std::vector<int32_t> ids = to_ids(tokens);
      std::vector<float> logits;
      size_t batch = 0, vocab = 0;
      {
        nb::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(_mutex);
        batch = _impl->rows().size();
        vocab = _impl->vocab_size();
        logits = _impl->step(ids);
      }
      return to_numpy<Array2>(std::move(logits), {batch, vocab});
    }

    // (log-probabilities of ids[1:], best ids, their log-probabilities), as three lists.
    nb::tuple score(nb::handle ids) {
      std::vector<int32_t> sequence = to_ids(ids);
      neox::Scored scored;
      {
        nb::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(_mutex);
        scored = _impl->score(sequence);
      }
      return nb::make_tuple(nb::cast(scored.chosen), nb::cast(scored.best), nb::cast(scored.best_scores));
    }

    void drop(nb::handle row_ids) {
      std::vector<int64_t> ids;
      if (nb::isinstance<nb::int_>(row_ids))
        ids.push_back(nb::cast<int64_t>(row_ids));
      else
        for (nb::handle item : row_ids)
          ids.push_back(nb::cast<int64_t>(item));
      nb::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(_mutex);
      _impl->drop(ids);
    }

    void reset() {
      nb::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(_mutex);
      _impl->reset();
    }

    std::vector<int64_t> rows() {
      nb::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(_mutex);
      std::vector<int64_t> ids;
      for (const auto& r : _impl->rows())
        ids.push_back(r.id);
      return ids;
    }

    std::vector<int64_t> lengths() {
      nb::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(_mutex);
      std::vector<int64_t> out;
      for (const auto& r : _impl->rows())
        out.push_back(r.length);
      return out;
    }

    int64_t cache_columns() {
      nb::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(_mutex);
      return _impl->cache_columns();
    }

    const neox::NeoXDecoder& impl() const { return *_impl; }

  private:
    std::unique_ptr<neox::NeoXDecoder> _impl;
    std::mutex _mutex;
  };

}

NB_MODULE(_native, m) {
  m.doc() = "GPT-NeoX forward pass on CTranslate2 layers/ops with a per-row KV cache (jachat native/)";
  nb::class_<Decoder>(m, "Decoder")
    .def(nb::init<const std::string&, const std::string&, const std::string&, int, int>(),
         "model_dir"_a, "device"_a = "cpu", "compute_type"_a = "default",
         "device_index"_a = 0, "intra_threads"_a = 1)
    .def("join", &Decoder::join, "row_id"_a, "prompt_ids"_a,
         "Prefill one row's prompt but its last token alone (what extend has not) and join the "
         "running batch; the last prompt token is its input at the next step.")
    .def("extend", &Decoder::extend, "row_id"_a, "ids"_a,
         "Prefill the next part of a row's prompt into a cache of its own, outside the batch (a "
         "long prompt a chunk at a time); join with the whole prompt finishes it.")
    .def("pending", &Decoder::pending, "row_id"_a,
         "Prompt tokens of a row prefilled by extend so far (0: none).")
    .def("step", &Decoder::step, "tokens"_a,
         "One decode step for all running rows: {row_id: token} -> {row_id: float32 logits "
         "[vocab]} (views into one [rows, vocab] array).")
    .def("step_array", &Decoder::step_array, "tokens"_a,
         "One decode step, tokens in `rows` order; returns float32 [rows, vocab].")
    .def("score", &Decoder::score, "ids"_a,
         "Teacher-forced scores of a sequence alone: (log-probabilities of ids[1:], the most likely "
         "token at each of those places, its log-probability).")
    .def("drop", &Decoder::drop, "row_ids"_a,
         "Remove rows (an id or an iterable of ids) and trim cache columns no row needs.")
    .def("reset", &Decoder::reset, "Remove every row.")
    .def_prop_ro("rows", &Decoder::rows, "Running row ids, in batch order.")
    .def_prop_ro("lengths", &Decoder::lengths, "Tokens in the cache per running row (rows order).")
    .def_prop_ro("cache_columns", &Decoder::cache_columns, "T of the [B, H, T, D] caches.")
    .def_prop_ro("vocab_size", [](const Decoder& d) { return d.impl().vocab_size(); })
    .def_prop_ro("num_layers", [](const Decoder& d) { return d.impl().num_layers(); })
    .def_prop_ro("num_heads", [](const Decoder& d) { return d.impl().num_heads(); })
    .def_prop_ro("head_dim", [](const Decoder& d) { return d.impl().head_dim(); })
    .def_prop_ro("hidden_size", [](const Decoder& d) { return d.impl().hidden_size(); })
    .def_prop_ro("rotary_dim", [](const Decoder& d) { return d.impl().rotary_dim(); })
    .def_prop_ro("parallel_residual", [](const Decoder& d) { return d.impl().parallel_residual(); })
    .def_prop_ro("compute_type", [](const Decoder& d) { return d.impl().compute_type(); })
    .def_prop_ro("device", [](const Decoder& d) { return d.impl().device(); })
    .def_prop_ro("intra_threads", [](const Decoder& d) { return d.impl().intra_threads(); });
}
