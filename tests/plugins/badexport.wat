;; badexport: exports `start` as (i32) -> i32 instead of () -> i32; `pack` must refuse it.
(module
  (memory (export "memory") 1)
  (func (export "start") (param i32) (result i32)
    (local.get 0)))
