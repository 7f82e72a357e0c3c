;; wait: a plugin that stays alive about 2 s so tests can inspect the child in /proc.
;; Logs "waiting", then polls clock_now until 2e9 ns have passed since the first reading.
;; A short busy loop between readings keeps the number of broker calls (and audit records) low.
(module
  (import "forgeone" "log" (func $log (param i32 i32 i32) (result i32)))
  (import "forgeone" "clock_now" (func $clock_now (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 16) "waiting")

  (func (export "start") (result i32)
    (local $t0 i64)
    (local $i i32)
    (drop (call $log (i32.const 1) (i32.const 16) (i32.const 7)))
    (local.set $t0 (call $clock_now))
    (block $done
      (loop $poll
        ;; spin ~10M iterations (a few ms) between clock readings
        (local.set $i (i32.const 10000000))
        (loop $spin
          (local.set $i (i32.sub (local.get $i) (i32.const 1)))
          (br_if $spin (i32.gt_s (local.get $i) (i32.const 0))))
        (br_if $done
          (i64.ge_s (i64.sub (call $clock_now) (local.get $t0)) (i64.const 2000000000)))
        (br $poll)))
    (i32.const 0)))
