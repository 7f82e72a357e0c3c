;; bigmem: grows to about 120 MiB in steps of 10 MiB, past wasmtime's 64 MiB reservation
;; (the memory moves), touching each step; logs "grown" and returns 0 (2 if refused).
(module
  (import "forgeone" "log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "grown")
  (func (export "start") (result i32)
    (local $i i32)
    (loop $l
      (if (i32.eq (memory.grow (i32.const 160)) (i32.const -1)) (then (return (i32.const 2))))
      (i32.store (i32.mul (memory.size) (i32.const 65535)) (i32.const 7))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 12))))
    (drop (call $log (i32.const 1) (i32.const 0) (i32.const 5)))
    (i32.const 0)))
