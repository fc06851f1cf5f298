// Every op's schema, in one place. Kernels register per backend in csrc/<op>/<op>_{cpu,cuda}.
#include <Python.h>
#include <torch/library.h>

#include "common/cpu_alloc.h"
#include "common/cpu_features.h"
#include "ops.h"

namespace reuse_core {

std::string build_info() {
  std::string info = "{\"cpu_isa\": \"";
  info += cpu_isa_name(cpu_isa());
#ifdef REUSE_WITH_CUDA
  info += "\", \"cuda\": true, \"cuda_archs\": \"" REUSE_CUDA_ARCHS "\"}";
#else
  info += "\", \"cuda\": false, \"cuda_archs\": \"\"}";
#endif
  return info;
}

TORCH_LIBRARY(reuse_core, m) {
  // Loss (reduced, or per row for reduction=none) and the gradients, already scaled by the
  // reduction, for the inputs that asked for one (empty tensors otherwise).
  m.def(
      "distill_kl(Tensor student, Tensor teacher, Tensor? labels, float temperature, float kd_weight, "
      "float ce_weight, int ignore_index, int reduction, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)");
  // Members: K tensors (..., C), or one stacked (K, ..., C) when stacked. Returns the output and
  // (2, K, rows): each member row's max and log sum exp(z - max) (float32/float64) for the backward.
  m.def("ensemble_average(Tensor[] members, Tensor weights, int mode, bool stacked) -> (Tensor, Tensor)");
  m.def(
      "ensemble_average_backward(Tensor grad, Tensor[] members, Tensor weights, Tensor out, Tensor lse, "
      "int mode, bool stacked) -> (Tensor[], Tensor)");
  // q (B, H, Lq, D), k and v (B, Hkv, Lk, D), H a multiple of Hkv; key_padding_mask (B, Lk) bool,
  // True = ignore that key. Returns the output (B, H, Lq, D) and, for the backward, each row's
  // softmax statistics (2, B, H, Lq) (float32, float64 for float64): the max score m and log of
  // sum exp(s - m), kept apart so that exp(s - m - log l) stays exact for large scores; a row whose
  // keys are all masked has m = +inf. The backward returns dq, dk, dv.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor out, "
      "Tensor stats, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // Linear layer + distillation loss over chunks of rows: student logits = hidden (N.., H) @ weight^T
  // (+ bias), never materialised beyond a chunk. teacher_mode 0: dense teacher (teacher_hidden,
  // teacher_weight, teacher_bias?); 1 "bucket" / 2 "renormalize": sparse teacher (teacher_indices,
  // teacher_logprobs (.., k)). chunk_size <= 0 picks it from memory. Returns the loss and the
  // gradients (scaled by the reduction) of hidden, weight and bias for those asked (empty otherwise).
  // row_weight (N..) multiplies each row's gradient (the backward of reduction "none" passes the
  // incoming per-row gradient with reduction "sum"); the loss is not weighted.
  m.def(
      "fused_linear_distill(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_indices, "
      "Tensor? teacher_logprobs, int teacher_mode, Tensor? labels, Tensor? row_weight, float temperature, float kd_weight, "
      "float ce_weight, int ignore_index, int reduction, int chunk_size, bool grad_hidden, bool grad_weight, "
      "bool grad_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
  // Gives the CPU output cache's memory back to the system; returns how many bytes it held.
  m.def("empty_cache() -> int", &empty_cpu_cache);
}

}  // namespace reuse_core

// reuse_core._C is imported as a Python module; importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
