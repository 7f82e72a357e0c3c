;; badsig: imports forgeone.log with the wrong signature (i32) -> i32; `pack` must refuse it.
(module
  (import "forgeone" "log" (func $log (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "start") (result i32)
    (drop (call $log (i32.const 0)))
    (i32.const 0)))
