;; logflood: `start` calls log 1000 times with a short message (rate limits, audit volume,
;; broker throughput), then returns 0.
(module
  (import "forgeone" "log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "flood")
  (func (export "start") (result i32)
    (local $i i32)
    (loop $again
      (drop (call $log (i32.const 1) (i32.const 16) (i32.const 5)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 1000))))
    (i32.const 0)))
