;; deeprec: unbounded recursion; wasmtime must report "call stack exhausted" (its guard page
;; and signal handling work under the filter), nothing else may die.
(module
  (memory (export "memory") 1)
  (func $r (param i32) (result i32) (call $r (i32.add (local.get 0) (i32.const 1))))
  (func (export "start") (result i32) (call $r (i32.const 0))))
