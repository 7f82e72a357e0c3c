;; fail: `start` returns 7 (non-zero = failure); the launch must report it as such.
(module
  (memory (export "memory") 1)
  (func (export "start") (result i32)
    (i32.const 7)))
