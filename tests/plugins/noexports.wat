;; noexports: exports only `memory`, no lifecycle functions: every lifecycle step is a no-op.
(module
  (memory (export "memory") 1))
