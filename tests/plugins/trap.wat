;; trap: `start` traps immediately (unreachable); the launch must report a plugin failure.
(module
  (memory (export "memory") 1)
  (func (export "start") (result i32)
    unreachable))
