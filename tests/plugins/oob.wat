;; oob: a load far outside linear memory traps as "out of bounds memory access".
(module
  (memory (export "memory") 1)
  (func (export "start") (result i32) (i32.load (i32.const 1000000))))
