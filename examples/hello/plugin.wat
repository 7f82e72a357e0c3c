;; hello: the smallest real plugin. `start` reads the host clock, checks it is positive,
;; and logs one line at level 1 (info). Returns 1 if the clock was not positive.
(module
  (import "forgeone" "clock_now" (func $clock_now (result i64)))
  (import "forgeone" "log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from an isolated plugin")

  (func (export "init") (result i32) (i32.const 0))

  (func (export "start") (result i32)
    (if (i64.le_s (call $clock_now) (i64.const 0))
      (then (return (i32.const 1))))
    (drop (call $log (i32.const 1) (i32.const 16) (i32.const 29)))
    (i32.const 0))

  (func (export "stop") (result i32) (i32.const 0)))
