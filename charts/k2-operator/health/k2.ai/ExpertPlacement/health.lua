-- Argo CD health of an ExpertPlacement (k2.ai), from the status the k2 operator writes.
-- Invalid is Degraded (the previous generation stays in force); Applied by every rank is Healthy; ranks still
-- loading the generation is Progressing; no rank to apply it (the owning K2Serving is suspended) is Suspended.
-- Written for Argo CD's Lua 5.1 (gopher-lua); `obj` is the resource.

local function condition(status, kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local hs = {}
local status = obj.status or {}
local generation = obj.metadata.generation
if status.observedGeneration == nil or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local invalid = condition(status, "Invalid")
local applied = condition(status, "Applied")
local applying = condition(status, "Applying")

if is_true(invalid) then
  hs.status = "Degraded"
  hs.message = "Invalid: " .. describe(invalid, "the spec cannot be applied")
elseif status.totalRanks == 0 then
  hs.status = "Suspended"
  hs.message = "No rank to apply the placement (its K2Serving is suspended or gone)"
elseif is_true(applied) then
  hs.status = "Healthy"
  hs.message = "Applied: " .. describe(applied, "every rank runs the placement")
elseif is_true(applying) then
  hs.status = "Progressing"
  hs.message = "Applying: " .. describe(applying, "ranks are loading experts")
else
  hs.status = "Progressing"
  hs.message = "Waiting for the ranks"
end
return hs
